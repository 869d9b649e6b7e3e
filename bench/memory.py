"""(7) Memory: peak RSS of one worker per model, and of the API's gunicorn processes.

RSS is read from /proc every 0.2 s (and each process's own VmHWM high-water mark)
for the worker's process (with the default threads pool it holds the model; with
prefork, its pool processes too), and for the gunicorn master
and each of its worker processes. For MobileNet the numbers come from the end-to-end
run (3); for the other models a worker serving only that model runs a bulk batch
of URL jobs on its own stack. RSS counts pages shared after fork in every process
that maps them, so the totals are an upper bound on physical memory.
"""

from __future__ import annotations

from bench.common import MemorySampler, ServiceStack, fmt, main_json
from bench.end_to_end import bulk

OTHER_MODELS = ("mobilenet_v2", "inception_v3")
JOBS = {"mobilenet": 256, "mobilenet_v2": 256, "inception_v3": 96}
WORKER_LIMIT_MB = 1536
API_LIMIT_MB = 250


def measure_model(model: str, n: int) -> dict:
    with ServiceStack(models=(model,)) as stack:
        sampler = MemorySampler({"worker": stack.worker_pid(), "api": stack.api.pid}).start()
        try:
            scenario = bulk(stack, n)
        finally:
            memory = sampler.stop()
        procs = memory["worker"]["peak_per_process_mb"]
        main_pid = str(stack.worker_pid())
        return {
            "model": model,
            "source": f"bulk batch of {n} URL jobs",
            "images_per_s": scenario["images_per_s"],
            "worker_total_mb": memory["worker"]["peak_total_mb"],
            "worker_main_mb": procs.get(main_pid, 0.0),
            "worker_pool_mb": max((mb for p, mb in procs.items() if p != main_pid), default=0.0),
        }


def run(quick: bool = False, models: tuple[str, ...] | None = None) -> dict:
    if models is None:
        models = ("mobilenet",) if quick else ("mobilenet", *OTHER_MODELS)
    rows = [measure_model(m, 16 if quick else JOBS[m]) for m in models]
    return {"workers": rows, "api": None}


def from_end_to_end(e2e: dict) -> tuple[dict, dict]:
    m = e2e["memory"]
    worker = {
        "model": e2e["model"],
        "source": "end-to-end run (3)",
        "images_per_s": max(s["images_per_s"] for s in e2e["scenarios"]),
        "worker_total_mb": m["worker_total_mb"],
        "worker_main_mb": m["worker_main_mb"],
        "worker_pool_mb": m["worker_pool_mb"],
    }
    api = {k: m[k] for k in ("api_master_mb", "api_worker_max_mb", "api_processes", "api_total_mb")}
    return worker, api


def _pool_cell(mb: float) -> str:
    return f"{fmt(mb, 0)} MB" if mb else "none (threads pool)"


def report(result: dict) -> str:
    lines = [
        "| worker serving | peak RSS, all its processes | main process | largest pool "
        f"process (prefork only) | measured during | target < {WORKER_LIMIT_MB} MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["workers"]:
        verdict = "met" if r["worker_total_mb"] < WORKER_LIMIT_MB else "MISSED"
        if r["model"] != "mobilenet":
            verdict = f"({verdict.lower()}; the target is for MobileNet)"
        lines.append(
            f"| {r['model']} | **{fmt(r['worker_total_mb'], 0)} MB** | "
            f"{fmt(r['worker_main_mb'], 0)} MB | {_pool_cell(r['worker_pool_mb'])} | "
            f"{r['source']} | {verdict} |"
        )
    api = result.get("api")
    if api:
        verdict = "met" if api["api_worker_max_mb"] < API_LIMIT_MB else "MISSED"
        lines += [
            "",
            "| API (gunicorn) | peak RSS | target |",
            "|---|---|---|",
            f"| largest of {api['api_processes']} worker processes | "
            f"**{fmt(api['api_worker_max_mb'], 0)} MB** | {verdict} (< {API_LIMIT_MB} MB) |",
            f"| master process | {fmt(api['api_master_mb'], 0)} MB | |",
            f"| all {api['api_processes'] + 1} processes together | "
            f"{fmt(api['api_total_mb'], 0)} MB | |",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
