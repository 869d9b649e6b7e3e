"""The plumbing's own ceiling: the whole service with a model that costs nothing (issue #17 item 4).

``RUNTIME=null`` (worker/models/runtimes.py) answers every image with fixed
probabilities at once, a stand-in for a GPU. Everything else is real: the API under
gunicorn, Redis, PostgreSQL, Celery worker processes, loader processes, the local
photo server with the real photos. Two sweeps:

* loader processes 0 (the worker's own threads), 1 .. N (N = the cores), one worker;
* 1, 2 and 4 worker processes on the same Redis and PostgreSQL, LOADER_PROCESSES
  at its default.

Each point runs bulk (one ``POST /v1/batches`` of 2,000 URLs) and singles with
``Prefer: wait`` (16 clients, 2,000 jobs), and reports images/s and CPU milliseconds
per image by stage (API, worker model process, loader processes, PostgreSQL, Redis,
photo server, the benchmark's own clients) from /proc.

``python -m bench.null_model [--quick] [--json PATH]``.
"""

from __future__ import annotations

import contextlib
import os
import time

from bench import end_to_end
from bench.common import (
    BenchWorker,
    ServiceStack,
    cmdline,
    descendants,
    fmt,
    main_json,
    pids_matching,
)
from shared.config import Config, usable_cores

N_JOBS = 2000
CLIENTS = 16
WORKER_COUNTS = (1, 2, 4)
STAGES = ("api", "worker", "loaders", "postgres", "redis", "photo server", "driver (clients)")


class NullStack(ServiceStack):
    """A ServiceStack whose worker side is any number of workers, counted by stage."""

    def __init__(self, runtime: str = "null", **overrides) -> None:
        super().__init__(worker=False, runtime=runtime, **overrides)
        self.workers: list[BenchWorker] = []

    @contextlib.contextmanager
    def running(self, workers: int, loader_processes: str):
        """``workers`` worker processes with LOADER_PROCESSES=``loader_processes``."""
        config = self.config.replace(loader_processes=loader_processes)
        before = BenchWorker(config).ready_count()
        tag = f"{loader_processes}x{workers}-{time.monotonic_ns() % 10**6}"
        self.workers = [BenchWorker(config, name=f"null{i}-{tag}").start() for i in range(workers)]
        try:
            for i, w in enumerate(self.workers):
                w.wait_ready(before + i)  # one more entry in the ready hash per worker
            yield
        finally:
            for w in self.workers:
                w.stop()
            self.workers = []

    def worker_pid(self) -> int:
        return self.workers[0].proc.pid

    def _loader_pids(self) -> list[int]:
        return [
            pid
            for w in self.workers
            for pid in descendants(w.proc.pid)
            if "spawn_main" in cmdline(pid)  # not the resource tracker
        ]

    def model_pids(self) -> list[int]:
        loaders = set(self._loader_pids())
        pids = []
        for w in self.workers:
            pids += [w.proc.pid, *(p for p in descendants(w.proc.pid) if p not in loaders)]
        return pids

    def cpu_groups(self, driver: bool = True) -> dict:
        groups: dict = {
            "api": self.api.pid,
            "photo server": self.photos.pid,
            "worker": self.model_pids,
            "loaders": self._loader_pids,
            "postgres": self.pg_backends,
            "redis": lambda: pids_matching("redis-server"),
        }
        if driver:
            groups["driver (clients)"] = lambda: [os.getpid()]
        return groups


def _point(stack: NullStack, n: int, **labels) -> dict:
    bulk = end_to_end.bulk(stack, n)
    wait = end_to_end.singles(stack, n, CLIENTS, wait=True)
    return {**labels, "bulk": bulk, "singles_wait": wait}


def run(quick: bool = False, loader_counts=None, worker_counts=None) -> dict:
    cores = usable_cores()
    n = 24 if quick else N_JOBS
    if loader_counts is None:
        loader_counts = (1,) if quick else tuple(range(cores + 1))
    if worker_counts is None:
        worker_counts = (2,) if quick else WORKER_COUNTS
    default = Config().loader_processes
    with NullStack() as stack:
        loaders, workers = [], []
        for k in loader_counts:
            with stack.running(1, str(k)):
                end_to_end.singles(stack, 16, CLIENTS, wait=True)  # warm-up
                loaders.append(_point(stack, n, loader_processes=k, workers=1))
        for w in worker_counts:
            with stack.running(w, default):
                end_to_end.singles(stack, 16, CLIENTS, wait=True)
                workers.append(_point(stack, n, loader_processes=default, workers=w))
    return {
        "cores": cores,
        "default_loader_processes": Config().effective_loader_processes,
        "jobs": n,
        "clients": CLIENTS,
        "loaders": loaders,
        "workers": workers,
    }


def _rows(points: list[dict], key: str) -> list[str]:
    lines = []
    for p in points:
        cells = []
        for scenario in ("bulk", "singles_wait"):
            s = p[scenario]
            ok = "" if not s["failed"] else f" ({s['failed']} failed)"
            cells.append(f"**{fmt(s['images_per_s'])}**{ok}")
        for scenario in ("bulk", "singles_wait"):
            c = p[scenario]["cpu_ms_per_image"]
            cells.append(" / ".join(fmt(c.get(stage)) for stage in STAGES[:5]))
        lines.append(f"| {p[key]} | " + " | ".join(cells) + " |")
    return lines


def report(result: dict) -> str:
    head = (
        "| {} | bulk images/s | singles (wait) images/s | bulk CPU ms/image: api / worker / "
        "loaders / postgres / redis | singles (wait) CPU ms/image: same stages |"
    )
    lines = [
        f"Null model (`RUNTIME=null`: fixed answers, no forward pass), {result['jobs']} URLs "
        f"in bulk and {result['jobs']} singles with `Prefer: wait` from {result['clients']} "
        f"clients per point; {result['cores']} usable cores; LOADER_PROCESSES=auto means "
        f"{result['default_loader_processes']} here.",
        "",
        "Loader processes (one worker process; 0 = the worker's own loader threads):",
        "",
        head.format("loader processes"),
        "|---|---|---|---|---|",
        *_rows(result["loaders"], "loader_processes"),
        "",
        "Worker processes on one Redis and PostgreSQL (LOADER_PROCESSES at its default):",
        "",
        head.format("worker processes"),
        "|---|---|---|---|---|",
        *_rows(result["workers"], "workers"),
        "",
        "All stages, CPU ms per image (bulk), for each point above:",
        "",
        "| point | " + " | ".join(STAGES) + " | total |",
        "|---|" + "---|" * (len(STAGES) + 1),
    ]
    for kind, key in (("loaders", "loader_processes"), ("workers", "workers")):
        for p in result[kind]:
            c = p["bulk"]["cpu_ms_per_image"]
            total = sum(c.get(s, 0.0) for s in STAGES)
            label = f"{p[key]} {'loader processes' if kind == 'loaders' else 'workers'}"
            lines.append(
                f"| {label} | " + " | ".join(fmt(c.get(s)) for s in STAGES) + f" | {fmt(total)} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
