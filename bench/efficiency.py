"""The service's efficiency: its rates over a no-bookkeeping pipeline's, in one run.

    python -m bench.efficiency            # about 5 minutes on a quiet 2-core machine
    python -m bench.efficiency --quick    # the smoke: tiny counts, under a minute
    python -m bench.efficiency --write    # also replace its section in docs/benchmarks.md

EFFICIENCY = the service's images/s in a scenario / the images/s of the best plain
pipeline for the same work (``bench/no_bookkeeping.py``: loader threads, keep-alive
HTTP, draft decoding, batches of 16 through the same default runtime, in one process).
Both run on one stack, side by side: the same photo server, the same photos, the same
model and runtime. The pipeline runs before, between and after the service's three
scenarios (bulk, singles fire and forget, singles with wait: ``bench/end_to_end.py``),
and each scenario's denominator is the mean of the two pipeline rounds either side of
it: the shared hosts' speed drifts by 15-30 % within a run (docs/benchmarks.md), and
a scenario is compared with the pipeline at the same time. The ratio over the fastest
of all the rounds is reported beside it (the stricter one). The seed-style sync app
(``bench/seed_app.py``, its best shape in ``bench/seed_alternative.py``) is a reference
row, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench import end_to_end, no_bookkeeping, seed_alternative
from bench.common import (
    OUTPUT,
    ROOT,
    CpuMeter,
    ServiceStack,
    ensure_keras_home,
    fmt,
    loadavg,
    machine_info,
)

N_IMAGES = 1000
QUICK_IMAGES = 32
# Issue #22's targets: service rate / pipeline rate.
WAIT = "singles, wait for answer"
TARGETS = {WAIT: 0.65, "bulk": 0.85}
DOC = ROOT / "docs" / "benchmarks.md"
# The same title in run_all's report, so --write replaces that section.
TITLE = "## 9. Efficiency: the service against a no-bookkeeping pipeline"
SERVICE_CPU = ("worker", "loaders", "api", "postgres", "redis")  # not clients or photo hosts


class PipelineProcess:
    """``python -m bench.no_bookkeeping --serve`` in its own process (its own GIL and CPU
    count); started early, since loading the model takes seconds."""

    def __init__(self) -> None:
        ensure_keras_home()
        OUTPUT.mkdir(parents=True, exist_ok=True)
        self.log_path = OUTPUT / "bench-no-bookkeeping.log"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.no_bookkeeping", "--serve"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.info: dict | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the no-bookkeeping pipeline exited:\n{tail}")
        return json.loads(line)

    def ready(self) -> dict:
        if self.info is None:
            self.info = self._answer()["ready"]
        return self.info

    def run(self, urls: list[str], clients: int | None = None) -> dict:
        """One round over ``urls``; with ``clients``, that many waiting clients."""
        self.ready()
        self.proc.stdin.write(json.dumps({"urls": urls, "clients": clients}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pipeline_round(stack: ServiceStack, pipeline: PipelineProcess, quick: bool) -> dict:
    """One measured round over fresh URLs of the stack's photo server (after a warm one)."""
    pipeline.run(stack.urls((1 if quick else 2) * no_bookkeeping.BATCH, "warm"))
    urls = stack.urls(QUICK_IMAGES if quick else N_IMAGES)
    meter = CpuMeter({"pipeline": pipeline.pid, "photo server": stack.photos.pid}).start()
    out = pipeline.run(urls)
    out["cpu_cores"] = meter.stop()["cores"]
    return {**out, **pipeline.ready()}


def waiting_round(stack: ServiceStack, pipeline: PipelineProcess, quick: bool) -> dict:
    """The pipeline for end_to_end's waiting clients (as many, one image each at a time):
    the bound for the service's singles with wait on this machine."""
    clients = end_to_end.CLIENTS
    urls = stack.urls(QUICK_IMAGES if quick else N_IMAGES)
    meter = CpuMeter({"pipeline": pipeline.pid, "photo server": stack.photos.pid}).start()
    out = pipeline.run(urls, clients)
    out["cpu_cores"] = meter.stop()["cores"]
    return {**out, **pipeline.ready()}


def interleaved(stack: ServiceStack, pipeline: PipelineProcess, quick: bool) -> dict:
    """bench.end_to_end's three scenarios on this stack (after its warm-up), with a
    pipeline round before the first and after each (``end_to_end.interleaved``)."""
    n = QUICK_IMAGES if quick else N_IMAGES
    if not quick:  # set-up outside the measurement; quick mode measures nothing
        end_to_end.singles(stack, 16, end_to_end.CLIENTS, wait=True)
    return end_to_end.interleaved(
        end_to_end.scenario_runs(stack, n), lambda: pipeline_round(stack, pipeline, quick)
    )


def service_cpu_ms(scenario: dict) -> float | None:
    """CPU ms per image of the service's own processes in one end-to-end scenario."""
    per = scenario.get("cpu_ms_per_image")
    return sum(per.get(k, 0.0) for k in SERVICE_CPU) if per else None


def summarize(
    rounds: list[dict],
    scenarios: list[dict],
    seed: dict | None,
    waiting: dict | None = None,
    sides: dict[str, tuple[int, int]] | None = None,
) -> dict:
    """The efficiency rows. A scenario in ``sides`` is divided by the mean of its two
    pipeline rounds (indexes into ``rounds``), any other rate by the fastest round's;
    ``strict`` is over the fastest round's for all. ``waiting`` (the pipeline for
    waiting clients) is a row too, and the bound of the wait row."""
    best = max(rounds, key=lambda r: r["images_per_s"])
    base = best["images_per_s"]
    sides = sides or {}

    def denominator(name: str) -> float:
        if name not in sides:
            return base
        return sum(rounds[i]["images_per_s"] for i in sides[name]) / 2

    rows = [
        {
            "name": s["scenario"],
            "jobs": s["jobs"],
            "succeeded": s["succeeded"],
            "failed": s["failed"],
            "images_per_s": s["images_per_s"],
            "pipeline_per_s": (per_s := denominator(s["scenario"])),
            "efficiency": _ratio(s["images_per_s"], per_s),
            "strict": _ratio(s["images_per_s"], base),
            "target": TARGETS.get(s["scenario"]),
            "cpu_ms_per_image": service_cpu_ms(s),
            "mean_batch": (s.get("worker") or {}).get("mean_batch_size"),
        }
        for s in scenarios
    ]
    if seed:
        row = seed["best"]
        rows.append(
            {
                "name": f"seed-style app ({row['name']}, `{row.get('predict', 'predict')}`)",
                "jobs": row["requests"],
                "succeeded": row["ok"],
                "failed": row["failed"],
                "images_per_s": row["images_per_s"],
                "pipeline_per_s": base,
                "efficiency": _ratio(row["images_per_s"], base),
                "strict": _ratio(row["images_per_s"], base),
                "target": None,
                "cpu_ms_per_image": None,
                "mean_batch": None,
            }
        )
    if waiting:
        rows.append(
            {
                "name": f"no-bookkeeping pipeline, {waiting['clients']} waiting clients",
                "jobs": waiting["images"],
                "succeeded": waiting["ok"],
                "failed": waiting["failed"],
                "images_per_s": waiting["images_per_s"],
                "pipeline_per_s": base,
                "efficiency": _ratio(waiting["images_per_s"], base),
                "strict": _ratio(waiting["images_per_s"], base),
                "target": None,
                "cpu_ms_per_image": waiting["cpu_ms_per_image"],
                "mean_batch": waiting["mean_batch"],
            }
        )
    return {
        "pipeline": rounds,
        "pipeline_best": base,
        "rows": rows,
        "waiting": waiting,
        "interleaved": bool(sides),
    }


def _ratio(rate: float, base: float) -> float | None:
    return rate / base if base else None


def run(quick: bool = False, with_seed: bool = True) -> dict:
    """The whole section on a fresh stack. The seed app is skipped in quick mode."""
    pipeline = PipelineProcess()  # loads its model while the stack starts
    try:
        with ServiceStack() as stack:
            ran = interleaved(stack, pipeline, quick)
            waiting = waiting_round(stack, pipeline, quick)
    finally:
        pipeline.stop()
    seed = None
    if with_seed and not quick:
        # Its two predict_on_batch shapes: the third (model.predict) is never the best.
        seed = seed_alternative.run(shapes=seed_alternative.SHAPES[:2], n=N_IMAGES)
    return summarize(ran["rounds"], ran["scenarios"], seed, waiting, ran["sides"])


def _against_waiting_bound(result: dict) -> str:
    """The service's singles with wait over the pipeline for waiting clients."""
    waiting = result.get("waiting")
    wait = next((r for r in result["rows"] if r["name"] == WAIT), None)
    if not waiting or not wait or not waiting["images_per_s"]:
        return ""
    return (
        f" The same pipeline for {waiting['clients']} waiting clients (each sends its next "
        "image when it has the previous answer; the model takes what is loaded when it is "
        f"free) ran at {fmt(waiting['images_per_s'])}/s, "
        f"mean batch {fmt(waiting['mean_batch'])}; the service's singles with wait reach "
        f"**{fmt(wait['images_per_s'] / waiting['images_per_s'], 2)}** of it."
    )


def verdict(row: dict) -> str:
    if row["target"] is None or row["efficiency"] is None:
        return ""
    return "met" if row["efficiency"] >= row["target"] else "**MISSED**"


def report(result: dict) -> str:
    lines = [
        "| what | jobs | succeeded | failed | images/s | EFFICIENCY (÷ pipeline either "
        "side) | target | ÷ fastest pipeline round | CPU ms per image | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(result["pipeline"], 1):
        lines.append(
            f"| no-bookkeeping pipeline, round {i} ({p['loaders']} loader threads, batch "
            f"{p['batch']}, {p['runtime']}, {p['runtime_threads']} inference threads) | "
            f"{p['images']} | {p['ok']} | {p['failed']} | {fmt(p['images_per_s'])} | | | "
            f"{fmt(p['images_per_s'] / result['pipeline_best'], 2)} | "
            f"{fmt(p['cpu_ms_per_image'])} | {p['batch']} (at most) |"
        )
    for r in result["rows"]:
        target = f">= {r['target']:.2f}: {verdict(r)}" if r["target"] else ""
        lines.append(
            f"| {r['name']} | {r['jobs']} | {r['succeeded']} | {r['failed']} | "
            f"**{fmt(r['images_per_s'])}** | **{fmt(r['efficiency'], 2)}** "
            f"(÷ {fmt(r['pipeline_per_s'])}) | {target} | {fmt(r['strict'], 2)} | "
            f"{fmt(r['cpu_ms_per_image'])} | {fmt(r['mean_batch'])} |"
        )
    lines += ["", _method(result) + _against_waiting_bound(result)]
    return "\n".join(lines)


def _method(result: dict) -> str:
    others = " / ".join(fmt(p["cpu_cores"].get("other"), 2) for p in result["pipeline"])
    best = fmt(result["pipeline_best"])
    if result.get("interleaved"):
        order = (
            "The pipeline's rounds ran before the service's first scenario and after each "
            "(in the table's order), the waiting clients' pipeline after them and the "
            "seed-style app apart from the stack"
        )
        ratio = (
            "EFFICIENCY = a scenario's images/s over the mean of the two rounds either side "
            "of it (the host's speed drifts within a run); for the seed-style app and the "
            f"waiting clients' pipeline, over the fastest round ({best}/s)"
        )
    else:
        order = "The pipeline rounds ran before and after the service's scenarios"
        ratio = f"EFFICIENCY = a row's images/s over the fastest pipeline round ({best}/s)"
    return (
        f"{order}, on the same stack, photo server and photos (`bench/no_bookkeeping.py`: "
        "one process, loader threads with keep-alive sessions, JPEG draft decoding, batches "
        "through the service's model and runtime; no accounts, SQL or queue). "
        f"{ratio}. *÷ fastest pipeline round*: the stricter ratio, over the fastest of all "
        "the rounds. The service rows are `bench/end_to_end.py`'s scenarios (16 clients for "
        "singles; with wait, 16 users with one client each, which sends its next job when "
        "it has the previous answer). *CPU ms per image*: the pipeline's process, or the "
        "service's processes (worker, loaders, API, PostgreSQL, Redis; not the clients or "
        "the photo server). While the pipeline ran, the machine's other processes used "
        f"{others} cores (the service's idle processes and everyone else on the host). "
        "*Mean batch*: images per forward pass (the service's from its worker's metrics)."
    )


def write_section(text: str, path: Path = DOC) -> None:
    """Put ``text`` under TITLE in ``path``, replacing the section if it is there."""
    doc = path.read_text()
    block = f"{TITLE}\n\n{text.strip()}\n\n"
    pattern = re.compile(rf"^{re.escape(TITLE)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: block, doc)
    elif "\n## What limits it\n" in doc:  # where run_all puts it
        doc = doc.replace("\n## What limits it\n", "\n" + block + "## What limits it\n", 1)
    else:
        doc = doc.rstrip() + "\n\n" + block
    path.write_text(doc.rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--write", action="store_true", help=f"write the section into {DOC}")
    args = parser.parse_args(argv)
    started, before = datetime.now(UTC), loadavg()
    result = run(args.quick)
    info = machine_info()
    header = (
        f"Measured by `python -m bench.efficiency{' --quick' if args.quick else ''}` on "
        f"{started:%Y-%m-%d %H:%M} UTC, {info['nproc']} cores, {info['cpu_model']}; load "
        f"average {before} before, {loadavg()} after."
    )
    text = report(result) + "\n\n" + header
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.write:
        write_section(text)
    failed = any(r["failed"] or r["succeeded"] != r["jobs"] for r in result["rows"])
    return 1 if failed or any(p["failed"] for p in result["pipeline"]) else 0


if __name__ == "__main__":
    sys.exit(main())
