"""(3) End to end: URL jobs through the API (gunicorn), Redis, one worker and PostgreSQL.

Three ways in, one after another on the same stack, each with fresh users and
fresh unique URLs over the real photos:

* bulk: one ``POST /v1/batches`` with all N URLs;
* singles, fire and forget: N ``POST /v1/jobs`` from 16 concurrent clients, each
  sending its next job as soon as the API accepted the previous one;
* singles, wait for the answer: N ``POST /v1/jobs`` with ``Prefer: wait=60`` from
  16 users, one client each, each sending its next job when it has the previous
  result (what a client of the seed apps does).

``python -m bench.end_to_end`` then runs the bulk scenario again on a worker restarted
with ``RUNTIME=keras`` (``bulk_on_keras``): the ratio of the two is what the default
runtime buys end to end.

Throughput is succeeded jobs divided by the time from the first submission until
the last result was written (the newest ``completed_at`` in SQL; for the waiting
clients, until the last answer arrived). Also recorded: where the CPU went (from
/proc), the worker's mean batch size and how busy its model was (from the
worker's own metrics in Redis), and peak RSS of the worker and API processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import requests

from bench.common import (
    CpuMeter,
    MemorySampler,
    ServiceStack,
    closed_loop,
    fmt,
    latency_summary,
    main_json,
    wait_done,
)
from shared.config import Config

N_JOBS = 2000
CLIENTS = 16


def _metrics_delta(before: dict, after: dict, wall: float) -> dict:
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    batches = d.get("batch_size_count", 0)
    return {
        "batches": int(batches),
        "mean_batch_size": d["batch_size_sum"] / batches if batches else 0.0,
        "model_busy": d.get("model_forward_seconds_sum", 0.0) / wall if wall else 0.0,
        "mean_fetch_ms": (
            1000 * d["image_fetch_seconds_sum"] / d["image_fetch_seconds_count"]
            if d.get("image_fetch_seconds_count")
            else 0.0
        ),
    }


def _measure(stack: ServiceStack, body) -> dict:
    """Run ``body() -> dict`` with CPU and worker metrics around it."""
    before = stack.worker_metrics()
    meter = CpuMeter(stack.cpu_groups()).start()
    out = body()
    cpu = meter.stop()
    out["cpu_cores"] = cpu["cores"]
    images = max(1, out["succeeded"])
    out["cpu_ms_per_image"] = {
        k: 1000 * v * cpu["wall_s"] / images for k, v in cpu["cores"].items()
    }
    out["worker"] = _metrics_delta(before, stack.worker_metrics(), out["wall_s"])
    return out


def bulk(stack: ServiceStack, n: int) -> dict:
    user = stack.user(n)
    text = "\n".join(stack.urls(n))

    def body() -> dict:
        start = time.time()
        resp = stack.post_batch(user, text)
        accepted_s = time.time() - start
        resp.raise_for_status()
        batch_id = resp.json()["id"]
        counts, end = wait_done(stack.dsn, "batch_id = %s", (batch_id,), n, timeout=60 + n)
        wall = end - start
        return {
            "scenario": "bulk",
            "jobs": n,
            "succeeded": counts.get("succeeded", 0),
            "failed": counts.get("failed", 0),
            "wall_s": wall,
            "accept_s": accepted_s,
            "images_per_s": counts.get("succeeded", 0) / wall,
        }

    return _measure(stack, body)


def singles(stack: ServiceStack, n: int, clients: int, wait: bool) -> dict:
    users = [stack.user(n // clients + 2) for _ in range(clients)]
    urls = stack.urls(n)
    items = [(users[i % clients]["headers"], url) for i, url in enumerate(urls)]
    base = stack.api.url
    extra = {"Prefer": "wait=60"} if wait else {}

    def call(session: requests.Session, item) -> bool:
        headers, url = item
        resp = session.post(f"{base}/v1/jobs", json={"url": url}, headers={**headers, **extra})
        if wait:
            return resp.status_code == 200 and resp.json()["status"] == "succeeded"
        return resp.status_code == 202

    def body() -> dict:
        # With wait: one client per user, each holding one job at a time (lanes).
        driven = closed_loop(clients, items, call, lanes=wait)
        ids = [u["id"] for u in users]
        counts, end = wait_done(stack.dsn, "user_id = ANY(%s)", (ids,), n, timeout=60 + n)
        start = driven["start_epoch"]
        # Waiting clients are done when the last answer arrived; the others when the
        # last result was written.
        wall = driven["wall_s"] if wait else end - start
        return {
            "scenario": "singles, wait for answer" if wait else "singles, fire and forget",
            "jobs": n,
            "succeeded": counts.get("succeeded", 0),
            "failed": counts.get("failed", 0) + driven["failed"],
            "wall_s": wall,
            "submit_s": driven["wall_s"],
            "submit_per_s": n / driven["wall_s"],
            "images_per_s": (driven["ok"] if wait else counts.get("succeeded", 0)) / wall,
            "client_latency": latency_summary(driven["latencies"]),
            "failures_sample": driven["failures_sample"],
        }

    return _measure(stack, body)


def scenario_runs(stack: ServiceStack, n: int) -> list[Callable[[], dict]]:
    """The three scenarios, in the order they run."""
    return [
        lambda: bulk(stack, n),
        lambda: singles(stack, n, CLIENTS, wait=False),
        lambda: singles(stack, n, CLIENTS, wait=True),
    ]


def interleaved(runs: list[Callable[[], dict]], between: Callable[[], dict] | None) -> dict:
    """Each of ``runs``, with ``between()`` (a reference's round: bench.efficiency's
    pipeline) before the first and after each. Returns the scenarios, the rounds and,
    by scenario name, the indexes of the two rounds either side of it: the shared
    hosts' speed drifts within a run, and a scenario is compared with the reference
    measured at the same time."""
    rounds = [between()] if between else []
    scenarios, sides = [], {}
    for run_one in runs:
        scenarios.append(run_one())
        if between:
            rounds.append(between())
            sides[scenarios[-1]["scenario"]] = (len(rounds) - 2, len(rounds) - 1)
    return {"scenarios": scenarios, "rounds": rounds, "sides": sides}


def run_with(
    stack: ServiceStack, quick: bool = False, between: Callable[[], dict] | None = None
) -> dict:
    """The three scenarios; with ``between``, interleaved with its rounds (``interleaved``)."""
    n = 24 if quick else N_JOBS
    sampler = MemorySampler({"worker": stack.worker_pid(), "api": stack.api.pid}).start()
    try:
        # A few jobs first, so the first scenario does not pay for first-time set-up.
        singles(stack, 16, CLIENTS, wait=True)
        ran = interleaved(scenario_runs(stack, n), between)
    finally:
        memory = sampler.stop()
    scenarios = ran["scenarios"]
    api_procs = memory["api"]["peak_per_process_mb"]
    api_workers = {pid: mb for pid, mb in api_procs.items() if int(pid) != stack.api.pid}
    worker_procs = memory["worker"]["peak_per_process_mb"]
    return {
        "model": stack.models[0],
        "clients": CLIENTS,
        "scenarios": scenarios,
        "reference_rounds": ran["rounds"],
        "reference_sides": ran["sides"],
        "memory": {
            "worker_total_mb": memory["worker"]["peak_total_mb"],
            "worker_main_mb": worker_procs.get(str(stack.worker_pid()), 0.0),
            "worker_pool_mb": max(
                (mb for pid, mb in worker_procs.items() if int(pid) != stack.worker_pid()),
                default=0.0,
            ),
            "api_master_mb": memory["api"]["peak_per_process_mb"].get(str(stack.api.pid), 0.0),
            "api_worker_max_mb": max(api_workers.values(), default=0.0),
            "api_processes": len(api_workers),
            "api_total_mb": memory["api"]["peak_total_mb"],
        },
    }


def bulk_on_keras(stack: ServiceStack, quick: bool = False) -> dict:
    """The bulk scenario again on a worker with ``RUNTIME=keras`` (the runtime every
    worker used before ``RUNTIME=auto``), for the runtime ratio. The stack is left with
    no worker: its callers run nothing after it that needs one."""
    default = stack.config
    stack.stop_worker()
    stack.config = default.replace(runtime="keras")
    try:
        stack.start_worker()
        singles(stack, 16, CLIENTS, wait=True)  # as run_with: set-up outside the measurement
        scenario = bulk(stack, 24 if quick else N_JOBS)
    finally:
        stack.stop_worker()
        stack.config = default
    return {**scenario, "scenario": "bulk, RUNTIME=keras"}


def run(quick: bool = False) -> dict:
    with ServiceStack() as stack:
        result = run_with(stack, quick)
        result["keras_bulk"] = bulk_on_keras(stack, quick)
        return result


def _worker_shape() -> str:
    c = Config()
    return (
        f"WORKER_POOL {c.worker_pool}, WORKER_CONCURRENCY {c.worker_concurrency}, "
        f"BATCH_MAX {c.batch_max}, BATCH_WAIT_MS {c.batch_wait_ms}"
    )


CPU_ORDER = ("worker", "api", "postgres", "redis", "photo server", "driver (clients)", "other")


def report(result: dict, limit: float | None = None) -> str:
    lines = [
        "| scenario | jobs | succeeded | failed | seconds | images/s | vs (1) best | "
        "mean batch | model busy | client p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    scenarios = [*result["scenarios"], *filter(None, [result.get("keras_bulk")])]
    for s in scenarios:
        lat = s.get("client_latency")
        lat_cell = f"{fmt(lat['p50_ms'], 0)} / {fmt(lat['p99_ms'], 0)}" if lat else "n/a"
        ratio = f"{100 * s['images_per_s'] / limit:.0f}%" if limit else "n/a"
        lines.append(
            f"| {s['scenario']} | {s['jobs']} | {s['succeeded']} | {s['failed']} | "
            f"{fmt(s['wall_s'], 2)} | **{fmt(s['images_per_s'])}** | {ratio} | "
            f"{fmt(s['worker']['mean_batch_size'])} | {100 * s['worker']['model_busy']:.0f}% | "
            f"{lat_cell} |"
        )
    lines += ["", "Where the two cores went (mean cores busy per scenario, from /proc):", ""]
    lines.append("| scenario | " + " | ".join(CPU_ORDER) + " | machine |")
    lines.append("|---|" + "---|" * (len(CPU_ORDER) + 1))
    for s in scenarios:
        c = s["cpu_cores"]
        lines.append(
            f"| {s['scenario']} | "
            + " | ".join(fmt(c.get(k), 2) for k in CPU_ORDER)
            + f" | {fmt(c.get('machine'), 2)} |"
        )
    lines += ["", "CPU milliseconds per succeeded image, by process group:", ""]
    lines.append("| scenario | " + " | ".join(CPU_ORDER[:-1]) + " | benchmark total |")
    lines.append("|---|" + "---|" * len(CPU_ORDER))
    for s in scenarios:
        c = s.get("cpu_ms_per_image")
        if not c:
            continue
        ours = sum(c.get(k, 0) for k in CPU_ORDER[:-1])
        lines.append(
            f"| {s['scenario']} | "
            + " | ".join(fmt(c.get(k)) for k in CPU_ORDER[:-1])
            + f" | {fmt(ours)} |"
        )
    lines += [
        "",
        f"Model `{result['model']}`, {result['clients']} client threads, one worker "
        f"({_worker_shape()}: the defaults), the API "
        "under `gunicorn -c gunicorn.conf.py` (its defaults: 4 gthread processes x 32 "
        "threads on this machine). *Model busy* is the worker's own sum of forward-pass "
        "time divided by the scenario's wall time; *mean batch* is images per forward "
        "pass. *other* is CPU used by processes outside this benchmark (other users of "
        "the machine) and by PostgreSQL's background processes. Every row but the last "
        "runs the default `RUNTIME=auto` (worker/models/runtimes.py picks what runs the "
        "model on this machine); *bulk, RUNTIME=keras* repeats the bulk scenario on a "
        "worker restarted with TF-Keras' own `predict_on_batch`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
