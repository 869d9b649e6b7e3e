"""Run every benchmark side by side and write docs/benchmarks.md.

    python -m bench.run_all            # the full suite (about 15-20 minutes on 2 cores)
    python -m bench.run_all --quick    # the smoke version CI runs: tiny counts, seconds each

Sections that load TensorFlow in the measuring process (1, 2) run in their own
processes; the service sections (3, 4, 6, 7) share one stack: a fresh PostgreSQL
database, the API under gunicorn, one worker and a photo server; (6) runs on the
same API after the worker is stopped, and before that the bulk scenario of (3) runs
once more on a worker with ``RUNTIME=keras``, for the runtime ratio of issue #17.
(9), the service's efficiency, runs a no-bookkeeping pipeline (``bench.no_bookkeeping``,
in a process of its own) on the stack's photo server before, between and after (3)'s
scenarios and divides each scenario's rate by the mean of the pipeline's rounds either
side of it (``bench.efficiency``, also a command of its own).
MobileNet's limit is measured again at the end (``bench.model_recheck``), because the
shared host's speed drifts. A section that fails is reported as such and the command
exits non-zero after writing the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    api_only,
    bulk_accept,
    efficiency,
    end_to_end,
    latency,
    memory,
    model_limit,
    model_recheck,
    null_model,
    pipeline,
    profile,
    seed_alternative,
)
from bench.common import OUTPUT, ROOT, ServiceStack, ensure_keras_home, fmt, loadavg, machine_info

DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
DEFAULT_JSON = OUTPUT / "bench-results.json"
NOTES = ROOT / "bench" / "NOTES.md"

E2E_TARGET = 0.85
SEED_TARGET = 1.5
IDLE_P50_SLACK_MS = 40
BUSY_P99_MS = 1000
API_RATE = 300
API_P99_MS = 50
# Issue #17 (throughput per machine): its targets, each a row of its own.
WAIT_SEED_TARGET = 2.5  # singles with wait vs the seed-style app
RUNTIME_TARGET = 3.0  # bulk on the default runtime vs on RUNTIME=keras
OVERHEAD_MS = {"bulk": 3.0, "singles_wait": 10.0}  # CPU per image outside the forward pass
LONE_P50_SLACK_MS = 25
WAIT_P99_MS = 500
API_SATURATION = 500
NULL_CEILING = {"bulk": 300.0, "singles_wait": 150.0}
SERVICE_CPU = ("api", "worker", "loaders", "postgres", "redis")  # not clients, not image hosts


class Runner:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.results: dict[str, dict] = {}
        self.errors: dict[str, str] = {}
        self.timing: list[tuple[str, float, str, str]] = []

    def section(self, key: str, fn) -> dict | None:
        before = loadavg()
        start = time.monotonic()
        print(f"[bench] {key} (load {before}) ...", flush=True)
        try:
            self.results[key] = fn()
        except Exception as exc:
            self.errors[key] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        seconds = time.monotonic() - start
        self.timing.append((key, seconds, before, loadavg()))
        print(f"[bench] {key} done in {seconds:.0f} s", flush=True)
        return self.results.get(key)

    def launch(self, *modules: str):
        """Run the modules' ``run()`` in one new process (``python -m bench.run_all --only``);
        the returned callable waits for it and returns {module: result}."""
        name = "+".join(modules)
        out = Path(tempfile.mkstemp(suffix=".json", prefix=f"bench-{name}-")[1])
        cmd = [sys.executable, "-m", "bench.run_all", "--only", ",".join(modules)]
        cmd += ["--json", str(out)]
        if self.quick:
            cmd.append("--quick")
        OUTPUT.mkdir(parents=True, exist_ok=True)
        log_path = OUTPUT / f"bench-{name}.log"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

        def wait() -> dict:
            try:
                if proc.wait() != 0:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"bench {name} exited {proc.returncode}:\n{tail}")
                return json.loads(out.read_text())
            finally:
                out.unlink(missing_ok=True)

        return wait

    def subprocess(self, module: str) -> dict:
        return self.launch(module)()[module]


def run(quick: bool) -> Runner:
    """Full mode runs one section at a time. Quick mode (a smoke test, not a measurement)
    runs the sections that have processes of their own alongside the service stack."""
    ensure_keras_home()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    r = Runner(quick)
    if quick:
        # One TensorFlow import for the three.
        in_model_process = r.launch("model_limit", "pipeline", "model_recheck")
        in_seed_process = r.launch("seed_alternative")
        in_null_process = r.launch("null_model")
    else:
        r.section("model_limit", lambda: r.subprocess("model_limit"))
        r.section("pipeline", lambda: r.subprocess("pipeline"))
    # (9)'s pipeline loads its model while the stack starts, and runs on the stack's photo
    # server before, between and after (3)'s scenarios, which it is compared with.
    plain = efficiency.PipelineProcess()
    try:
        with ServiceStack() as stack:
            e2e = r.section(
                "end_to_end",
                lambda: end_to_end.run_with(
                    stack, quick, between=lambda: efficiency.pipeline_round(stack, plain, quick)
                ),
            )
            r.section(
                "no_bookkeeping_waiting", lambda: efficiency.waiting_round(stack, plain, quick)
            )
            plain.stop()  # its memory, before the sections below
            if e2e:
                best, wait = latency.saturation(e2e)
                r.section(
                    "latency", lambda: latency.run_with(stack, best, quick, wait_saturated=wait)
                )
            r.section("profile", lambda: profile.run_with(stack, 24 if quick else 1500, quick))
            # Last with a worker: it leaves none, and (6) below runs with none.
            r.section("keras_bulk", lambda: end_to_end.bulk_on_keras(stack, quick))
            stack.stop_worker()  # already stopped by the Keras section; (6) must not rely on it
            r.section("api_only", lambda: api_only.run_with(stack, quick))
    except Exception as exc:  # the stack itself did not start
        r.errors.setdefault("end_to_end", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        plain.stop()
    if quick:
        both: dict = {}
        r.section("model_limit", lambda: both.setdefault("r", in_model_process())["model_limit"])
        if "r" in both:
            r.section("pipeline", lambda: both["r"]["pipeline"])
            r.section("model_recheck", lambda: both["r"]["model_recheck"])
        r.section("seed_alternative", lambda: in_seed_process()["seed_alternative"])
        r.section("null_model", lambda: in_null_process()["null_model"])
    else:
        r.section("memory", lambda: memory.run(quick, models=memory.OTHER_MODELS))
        r.section("seed_alternative", lambda: r.subprocess("seed_alternative"))
        r.section("null_model", lambda: r.subprocess("null_model"))
    r.section("bulk_accept", lambda: bulk_accept.run(quick))
    if not quick:
        r.section("model_recheck", lambda: r.subprocess("model_recheck"))
    return r


# --- the report -------------------------------------------------------------------------


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}{' plus uncommitted changes' if dirty else ''}"


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "n/a"
    return "met" if ok else "**MISSED**"


def below(value: float | None, bound: float | None) -> bool | None:
    """value < bound, or None (no verdict) when either is missing or NaN."""
    if value is None or bound is None or value != value:
        return None
    return value < bound


def headline(res: dict) -> tuple[list[str], dict]:
    """The targets table, and the derived numbers the analysis uses."""
    lim = res.get("model_limit", {}).get("models", {}).get("mobilenet")
    again = res.get("model_recheck")
    # The stricter bound when the host's speed drifted between the two measurements.
    best = max(
        (x["best"] for x in (lim, again) if x), key=lambda b: b["images_per_s"], default=None
    )
    limit_best = best["images_per_s"] if best else None
    ones = [x["batch_ms"] for m in (lim, again) if m for x in m["rows"] if x["batch_size"] == 1]
    batch1_ms = min(ones, default=None)  # likewise the stricter bound
    e2e = res.get("end_to_end")
    seed = res.get("seed_alternative")
    seed_best = seed["best"]["images_per_s"] if seed else None
    lines = ["| # | target | measured | verdict |", "|---|---|---|---|"]
    derived = {"limit_best": limit_best, "batch1_ms": batch1_ms, "seed_best": seed_best}
    where = (
        ", re-measured at the end"
        if best is not None and best is not (lim or {}).get("best")
        else ""
    )
    if e2e:
        for s in e2e["scenarios"]:
            ratio = s["images_per_s"] / limit_best if limit_best else None
            lines.append(
                f"| 3 | end to end ({s['scenario']}) >= {E2E_TARGET:.0%} of (1)'s best "
                f"MobileNet throughput ({fmt(limit_best)}/s at b={best['batch_size']}{where}) | "
                f"{fmt(s['images_per_s'])}/s = {fmt(100 * ratio, 0) if ratio else 'n/a'}% | "
                f"{verdict(ratio >= E2E_TARGET if ratio else None)} |"
            )
        for s in e2e["scenarios"]:
            ratio = s["images_per_s"] / seed_best if seed_best else None
            lines.append(
                f"| 3 vs 5 | end to end ({s['scenario']}) >= {SEED_TARGET}x the seed-style "
                f"app ({fmt(seed_best)}/s, best shape) | {fmt(ratio, 2)}x | "
                f"{verdict(ratio >= SEED_TARGET if ratio else None)} |"
            )
    lat = res.get("latency")
    if lat:
        levels = latency.load_levels(lat)
        low, high = levels.get(10), levels.get(90)
        if low:
            bound = batch1_ms + IDLE_P50_SLACK_MS if batch1_ms else None
            lines.append(
                f"| 4 | p50 latency at 10% load <= batch-1 time ({fmt(batch1_ms)} ms) + "
                f"{IDLE_P50_SLACK_MS} ms = {fmt(bound, 0)} ms | {fmt(low['p50_ms'], 0)} ms at "
                f"{fmt(low['offered_rate'])} jobs/s | "
                f"{verdict(below(low['p50_ms'], bound + 1e-9 if bound else None))} |"
            )
        if high:
            lines.append(
                f"| 4 | p99 latency at 90% load < {BUSY_P99_MS} ms | {fmt(high['p99_ms'], 0)} ms "
                f"at {fmt(high['offered_rate'])} jobs/s | "
                f"{verdict(below(high['p99_ms'], BUSY_P99_MS) and high['failed'] == 0)} |"
            )
    api = res.get("api_only")
    if api:
        sat, paced = api["saturation"], api["paced"]
        lines.append(
            f"| 6 | API alone >= {API_RATE} submissions/s | {fmt(sat['ok_per_s'])}/s "
            f"(p99 {fmt(sat['p99_ms'])} ms at saturation) | "
            f"{verdict(sat['ok_per_s'] >= API_RATE and sat['non_2xx'] == 0)} |"
        )
        at_rate = paced["ok_per_s"] >= 0.9 * API_RATE
        lines.append(
            f"| 6 | API p99 < {API_P99_MS} ms at about {API_RATE}/s | {fmt(paced['p99_ms'])} ms "
            f"at {fmt(paced['ok_per_s'])}/s | "
            f"{verdict(below(paced['p99_ms'], API_P99_MS) and at_rate)} |"
        )
    if e2e:
        m = e2e["memory"]
        lines.append(
            f"| 7 | MobileNet worker (all its processes) peak RSS < {memory.WORKER_LIMIT_MB} MB | "
            f"{fmt(m['worker_total_mb'], 0)} MB | "
            f"{verdict(m['worker_total_mb'] < memory.WORKER_LIMIT_MB)} |"
        )
        lines.append(
            f"| 7 | API process peak RSS < {memory.API_LIMIT_MB} MB | "
            f"{fmt(m['api_worker_max_mb'], 0)} MB (largest gunicorn worker) | "
            f"{verdict(m['api_worker_max_mb'] < memory.API_LIMIT_MB)} |"
        )
    lines += issue17_rows(res, derived)
    lines += issue22_rows(res)
    return lines, derived


def efficiency_result(res: dict) -> dict | None:
    """(9): the end-to-end scenarios over the no-bookkeeping pipeline's rounds, with the
    seed-style app's best shape as a reference row."""
    e2e = res.get("end_to_end")
    if not e2e or not e2e.get("reference_rounds"):
        return None
    return efficiency.summarize(
        e2e["reference_rounds"],
        e2e["scenarios"],
        res.get("seed_alternative"),
        res.get("no_bookkeeping_waiting"),
        e2e["reference_sides"],
    )


def issue22_rows(res: dict) -> list[str]:
    """Issue #22's efficiency targets: the service's rate over the no-bookkeeping pipeline's."""
    eff = efficiency_result(res)
    rows = []
    for r in eff["rows"] if eff else []:
        if r["target"] is not None:
            rows.append(
                f"| 22 | efficiency, {r['name']} >= {r['target']:.2f} (the service's rate over "
                f"the no-bookkeeping pipeline's either side, {fmt(r['pipeline_per_s'])}/s) | "
                f"{fmt(r['images_per_s'])}/s = {fmt(r['efficiency'], 2)} (over the fastest "
                f"round: {fmt(r['strict'], 2)}) | "
                f"{verdict(r['efficiency'] >= r['target'])} |"
            )
    return rows


def issue17_rows(res: dict, derived: dict) -> list[str]:
    """The throughput issue's targets (#17), from this run's sections."""
    rows: list[str] = []

    def row(target: str, measured: str, ok: bool | None) -> None:
        rows.append(f"| 17 | {target} | {measured} | {verdict(ok)} |")

    e2e, seed_best = res.get("end_to_end"), derived["seed_best"]
    by_name = {s["scenario"]: s for s in e2e["scenarios"]} if e2e else {}
    wait = by_name.get("singles, wait for answer")
    if wait and seed_best:
        ratio = wait["images_per_s"] / seed_best
        row(
            f"singles with wait >= {WAIT_SEED_TARGET}x the seed-style app ({fmt(seed_best)}/s)",
            f"{fmt(wait['images_per_s'])}/s = {fmt(ratio, 2)}x",
            ratio >= WAIT_SEED_TARGET,
        )
    keras, bulk = res.get("keras_bulk"), by_name.get("bulk")
    if keras and bulk and keras["images_per_s"]:
        ratio = bulk["images_per_s"] / keras["images_per_s"]
        row(
            f"bulk on the default runtime >= {RUNTIME_TARGET:g}x bulk on RUNTIME=keras "
            f"({fmt(keras['images_per_s'])}/s)",
            f"{fmt(bulk['images_per_s'])}/s = {fmt(ratio, 2)}x",
            ratio >= RUNTIME_TARGET,
        )
    null = res.get("null_model")
    if null:
        points = null["loaders"] + null["workers"]
        # The service as configured: one worker, LOADER_PROCESSES at its default.
        default = next((p for p in null["workers"] if p["workers"] == 1), None)
        for key, label in (("bulk", "bulk"), ("singles_wait", "singles with wait")):
            if default:
                per = default[key]["cpu_ms_per_image"]
                ms = sum(per.get(k, 0.0) for k in SERVICE_CPU)
                row(
                    f"CPU per image outside the forward pass, {label} (null model, one "
                    f"worker, service processes) <= {OVERHEAD_MS[key]:g} ms",
                    f"{fmt(ms)} ms",
                    ms <= OVERHEAD_MS[key],
                )
            best = max(p[key]["images_per_s"] for p in points)
            row(
                f"null-model ceiling, {label} >= {NULL_CEILING[key]:g} images/s",
                f"{fmt(best)}/s (best point of (8))",
                best >= NULL_CEILING[key],
            )
    lat = res.get("latency")
    if lat:
        low = latency.load_levels(lat).get(10)
        b1 = derived["batch1_ms"]
        if low and b1:
            bound = b1 + LONE_P50_SLACK_MS
            row(
                f"lone-request p50 (10% load) <= batch-1 time + {LONE_P50_SLACK_MS} ms = "
                f"{fmt(bound, 0)} ms",
                f"{fmt(low['p50_ms'], 0)} ms",
                below(low["p50_ms"], bound + 1e-9),
            )
        busy = latency.wait_level(lat)
        if busy:
            row(
                f"p99 < {WAIT_P99_MS} ms at {100 * latency.WAIT_LOAD:.0f}% of the "
                "wait-for-answer saturation",
                f"{fmt(busy['p99_ms'], 0)} ms at {fmt(busy['offered_rate'])} jobs/s",
                below(busy["p99_ms"], WAIT_P99_MS) and busy["failed"] == 0,
            )
    api = res.get("api_only")
    if api:
        sat = api["saturation"]
        row(
            f"API alone >= {API_SATURATION} submissions/s",
            f"{fmt(sat['ok_per_s'])}/s",
            sat["ok_per_s"] >= API_SATURATION and sat["non_2xx"] == 0,
        )
    return rows


def analysis(res: dict, derived: dict) -> list[str]:
    """Facts the numbers of this run support, computed rather than typed."""
    out = []
    lim, pipe, e2e = res.get("model_limit"), res.get("pipeline"), res.get("end_to_end")
    if lim and "mobilenet" in lim["models"]:
        rows = {x["batch_size"]: x for x in lim["models"]["mobilenet"]["rows"]}
        if 1 in rows and 32 in rows:
            out.append(
                f"- Batching pays on this CPU: MobileNet runs {fmt(rows[1]['images_per_s'])} "
                f"images/s one at a time and {fmt(rows[32]['images_per_s'])} images/s at "
                f"batch 32 ({rows[32]['images_per_s'] / rows[1]['images_per_s']:.1f}x)."
            )
    if pipe and derived["limit_best"]:
        rows = {x["batch_size"]: x for x in pipe["rows"]}
        big = rows.get(32) or pipe["best"]
        st = big["stage_ms"]
        total = sum(st.values()) or 1
        out.append(
            f"- The pipeline alone at batch {big['batch_size']}: {fmt(big['images_per_s'])} "
            f"images/s = {100 * big['images_per_s'] / derived['limit_best']:.0f}% of the model "
            f"limit; of its {fmt(big['batch_ms'], 0)} ms per batch, "
            + ", ".join(
                f"{label} {100 * st.get(k, 0) / total:.0f}%"
                for k, label in (
                    ("_load_inputs", "loading (fetch, decode, resize)"),
                    ("_predict", "the forward pass"),
                    ("_claim", "claiming"),
                    ("_write", "writing results"),
                )
            )
            + "."
        )
    if pipe and derived["limit_best"] and pipe.get("best_overlapped"):
        ov = pipe["best_overlapped"]
        alone = {x["batch_size"]: x for x in pipe["rows"]}.get(ov["batch_size"])
        out.append(
            f"- With two batches in flight (the threads pool) the pipeline reaches "
            f"{fmt(ov['images_per_s'])} images/s at batch {ov['batch_size']} = "
            f"{100 * ov['images_per_s'] / derived['limit_best']:.0f}% of the model limit"
            + (
                f", {ov['images_per_s'] / alone['images_per_s']:.2f}x one batch at a time."
                if alone
                else "."
            )
        )
    model_cpu = None
    if lim and "mobilenet" in lim["models"]:
        rows = {x["batch_size"]: x for x in lim["models"]["mobilenet"]["rows"]}
        at32 = rows.get(32) or lim["models"]["mobilenet"]["best"]
        model_cpu = at32.get("cpu_ms_per_image")
        model_rate = at32["images_per_s"]
    if e2e and model_cpu:
        for s in e2e["scenarios"]:
            per = s.get("cpu_ms_per_image")
            if not per:
                continue
            ours = sum(v for k, v in per.items() if k not in ("other", "machine"))
            out.append(
                f"- CPU budget, {s['scenario']}: the benchmark's processes spent "
                f"{fmt(ours)} CPU ms per image (worker {fmt(per.get('worker'))}, API "
                f"{fmt(per.get('api'))}, PostgreSQL {fmt(per.get('postgres'))}, clients "
                f"{fmt(per.get('driver (clients)'))}); the model alone needs "
                f"{fmt(model_cpu)} ms at batch 32. Even with both cores to itself, this "
                f"per-image cost allows at most {fmt(2000 / ours)} images/s = "
                f"{100 * 2000 / ours / model_rate:.0f}% of the model's own "
                f"{fmt(model_rate)} images/s at batch 32."
            )
    if e2e:
        for s in e2e["scenarios"]:
            c = s["cpu_cores"]
            out.append(
                f"- {s['scenario']}: {fmt(s['images_per_s'])} images/s, mean batch "
                f"{fmt(s['worker']['mean_batch_size'])}, model busy "
                f"{100 * s['worker']['model_busy']:.0f}% of the wall time; cores used: worker "
                f"{fmt(c.get('worker'), 2)}, API {fmt(c.get('api'), 2)}, PostgreSQL "
                f"{fmt(c.get('postgres'), 2)}, photo server {fmt(c.get('photo server'), 2)}, "
                f"clients {fmt(c.get('driver (clients)'), 2)}, outside the benchmark "
                f"{fmt(c.get('other'), 2)} (machine total {fmt(c.get('machine'), 2)} of 2)."
            )
    lat = res.get("latency")
    if lat:
        out.append(
            "- Adaptive batching under open-loop load: mean batch "
            + ", ".join(
                f"{fmt(x['mean_batch_size'])} at {pct}%"
                for pct, x in latency.load_levels(lat).items()
            )
            + "."
        )
        for x in lat["levels"]:
            if "bulk_jobs" in x:
                out.append(
                    f"- Beside a {x['bulk_jobs']:,}-URL bulk batch, single jobs at "
                    f"{fmt(x['offered_rate'])}/s answered in {fmt(x['p50_ms'], 0)} ms (p50), "
                    f"{fmt(x['p99_ms'], 0)} ms (p99); {x['bulk_left']:,} bulk jobs were "
                    "still unfinished when the window ended."
                )
    return out


def render(
    r: Runner, command: str, started: datetime, finished: datetime, commit: str | None = None
) -> str:
    res = r.results
    info = machine_info()
    targets, derived = headline(res)
    e2e = res.get("end_to_end")
    tf_version = res.get("model_limit", {}).get("tensorflow", "?")
    lines = [
        "# Benchmarks",
        "",
        'Generated by `bench/run_all.py`; every number up to "What limits it" was measured '
        "in the one run described here, side by side on the same machine, except section 9 "
        "when `python -m bench.efficiency --write` has rewritten it since (its own command "
        "and date close it). Regenerate with the command below (the lead re-runs it after "
        'changes to the worker or the API). The sections after "What limits it" are '
        "written by hand, each with its own command, machine and date: they are "
        "bench/NOTES.md, which this report appends.",
        "",
        f"- Command: `{command}`"
        + (" (**quick smoke mode: tiny counts, not a measurement**)" if r.quick else ""),
        f"- Date: {started:%Y-%m-%d %H:%M} to {finished:%H:%M} UTC",
        f"- Machine: {info['nproc']} cores, {info['cpu_model']}, {info['ram_gb']} GB RAM, "
        f"{info['machine']}; Python {info['python']}, TensorFlow {tf_version} (CPU)",
        f"- Code: git commit {commit or git_commit()}",
        "- Services: local PostgreSQL 15 and Redis, shared with other users of the machine; "
        "every run makes its own database and queue prefix",
        "- Load average (1, 5, 15 min) before/after each section, since the machine is "
        "shared: " + "; ".join(f"{k} {b} / {a}" for k, _, b, a in r.timing),
        "",
    ]
    if r.errors:
        lines += ["## Sections that failed", ""]
        lines += [f"- **{k}**: `{v.splitlines()[0]}`" for k, v in r.errors.items()]
        lines.append("")
    lines += ["## Targets", "", *targets, ""]

    def section(title: str, key: str, render_fn) -> None:
        lines.extend([f"## {title}", ""])
        if key in res:
            lines.extend([render_fn(res[key]), ""])
        else:
            lines.extend([f"FAILED: {r.errors.get(key, 'not run')}", ""])

    limit = derived["limit_best"]
    section("1. Limit: the model alone, in-process", "model_limit", model_limit.report)
    if "model_recheck" in res and "mobilenet" in res.get("model_limit", {}).get("models", {}):
        first = res["model_limit"]["models"]["mobilenet"]
        lines += [model_recheck.report(first, res["model_recheck"]), ""]
    section("2. The worker pipeline alone", "pipeline", pipeline.report)
    if e2e and "keras_bulk" in res:
        e2e["keras_bulk"] = res["keras_bulk"]
    section(
        "3. End to end: API, Redis, worker, PostgreSQL",
        "end_to_end",
        lambda x: end_to_end.report(x, limit),
    )
    section("4. Latency of single jobs under open-loop load", "latency", latency.report)
    section(
        "5. The alternative: a seed-style Flask app, one image per request",
        "seed_alternative",
        lambda x: (
            seed_alternative.report(x)
            + (
                "\n\nRatio of the service's end-to-end throughput (3) to the best shape here: "
                + ", ".join(
                    f"{s['scenario']} {s['images_per_s'] / x['best']['images_per_s']:.2f}x"
                    for s in e2e["scenarios"]
                )
                + "."
                if e2e
                else ""
            )
        ),
    )
    section("6. The API alone (worker stopped)", "api_only", api_only.report)
    mem = {"workers": [], "api": None}
    if e2e:
        worker_row, api_row = memory.from_end_to_end(e2e)
        mem = {"workers": [worker_row], "api": api_row}
    if "memory" in res:
        mem["workers"] += res["memory"]["workers"]
    res["_memory"] = mem
    section("7. Memory", "_memory", memory.report)
    lines.append(memory.__doc__.split("\n\n", 1)[1].strip().replace("\n", " "))
    lines.append("")
    section("Bulk acceptance (in-process)", "bulk_accept", bulk_accept.report)
    section(
        "8. The plumbing's ceiling: a null model, loader and worker processes",
        "null_model",
        null_model.report,
    )
    eff = efficiency_result(res)
    if eff:
        res["_efficiency"] = eff
    section(efficiency.TITLE.removeprefix("## "), "_efficiency", efficiency.report)
    lines += ["## What limits it", "", "Computed from this run:", ""]
    lines += analysis(res, derived) or ["- (no data)"]
    lines.append("")
    if "profile" in res:
        lines += ["Profile of the worker:", "", profile.report(res["profile"]), ""]
    if NOTES.exists():
        lines += [NOTES.read_text().strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: the CI smoke run")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="report path (markdown)")
    parser.add_argument(
        "--json", default=str(DEFAULT_JSON), help=f"raw results (default {DEFAULT_JSON})"
    )
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="measure nothing: rewrite the report from a saved run's raw results "
        "(e.g. after editing bench/NOTES.md)",
    )
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run modules, write JSON
    args = parser.parse_args(argv)
    if args.only:
        import importlib

        modules = args.only.split(",")
        results = {m: importlib.import_module(f"bench.{m}").run(quick=args.quick) for m in modules}
        Path(args.json).write_text(json.dumps(results, default=str))
        return 0
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        r = Runner(saved["quick"])
        r.results, r.errors = saved["results"], saved["errors"]
        r.timing = [tuple(t) for t in saved["timing"]]
        command, started, finished = saved["command"], saved["started"], saved["finished"]
    else:
        command = "python -m bench.run_all" + (" --quick" if args.quick else "")
        if args.out != str(DEFAULT_OUT):
            command += f" --out {args.out}"
        started = datetime.now(UTC).isoformat()
        r = run(args.quick)
        finished = datetime.now(UTC).isoformat()
        saved = {
            "command": command,
            "started": started,
            "finished": finished,
            "quick": r.quick,
            "commit": git_commit(),
            "machine": machine_info(),
            "timing": r.timing,
            "errors": r.errors,
            "results": r.results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(saved, indent=1, default=str))
    text = render(
        r,
        command,
        datetime.fromisoformat(started),
        datetime.fromisoformat(finished),
        saved.get("commit"),
    )
    Path(args.out).write_text(text)
    print(f"[bench] wrote {args.out} (raw results: {args.render or args.json})", flush=True)
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
