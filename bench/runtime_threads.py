"""Bulk end to end for a few RUNTIME_THREADS x LOADER_PROCESSES: who should get the cores.

    python -m bench.runtime_threads              # 4 points x 500 images, about 3 minutes
    python -m bench.runtime_threads --rounds 2   # each point twice, the second pass reversed
    python -m bench.runtime_threads --quick      # a smoke: 2 points x 24 images

On one stack (``bench.common.ServiceStack``), the worker is restarted for each point with
``RUNTIME_THREADS`` (OpenVINO's inference threads; 0 = its own choice, one per core) and
``LOADER_PROCESSES`` (0: the worker's own threads load the images; 1: one loader
process) and runs ``bench.end_to_end``'s bulk scenario on fresh URLs. Reported per
point: images/s and the CPU per image of the worker (its loader processes included)
and of the whole machine. On a shared, busy host the differences are indicative only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench import end_to_end
from bench.common import ServiceStack, fmt, loadavg, machine_info
from shared.config import usable_cores

N_IMAGES = 500


def points(cores: int, quick: bool) -> list[tuple[int, int]]:
    """(runtime_threads, loader_processes): OpenVINO's choice and one thread fewer than
    the cores (at least 1), each without and with one loader process."""
    fewer = max(1, cores - 1)
    threads = (0,) if quick else (0, fewer)
    return [(t, lp) for lp in (0, 1) for t in threads]


def measure(stack: ServiceStack, threads: int, loaders: int, n: int) -> dict:
    default = stack.config
    stack.stop_worker()
    stack.config = default.replace(runtime_threads=threads, loader_processes=str(loaders))
    try:
        stack.start_worker()
        end_to_end.singles(stack, 16, end_to_end.CLIENTS, wait=True)  # set-up, not measured
        s = end_to_end.bulk(stack, n)
    finally:
        stack.stop_worker()
        stack.config = default
    per = s["cpu_ms_per_image"]
    return {
        "runtime_threads": threads,
        "loader_processes": loaders,
        "jobs": s["jobs"],
        "succeeded": s["succeeded"],
        "failed": s["failed"],
        "images_per_s": s["images_per_s"],
        "worker_cpu_ms": per.get("worker"),  # the worker's process tree: loaders included
        "machine_cpu_ms": per.get("machine"),
        "other_cores": s["cpu_cores"].get("other"),
        "load": loadavg(),
    }


def run(quick: bool = False, rounds: int = 1) -> dict:
    cores = usable_cores()
    grid = points(cores, quick)
    n = 24 if quick else N_IMAGES
    out: list[dict] = []
    with ServiceStack(worker=False) as stack:
        for i in range(rounds):
            # Alternate the order, so a host slowing down does not favour the first points.
            for threads, loaders in grid if i % 2 == 0 else grid[::-1]:
                out.append(measure(stack, threads, loaders, n))
                print(json.dumps(out[-1]), flush=True)
    return {"cores": cores, "rounds": rounds, "runs": out}


def report(result: dict) -> str:
    by_point: dict[tuple, list[dict]] = {}
    for r in result["runs"]:
        by_point.setdefault((r["runtime_threads"], r["loader_processes"]), []).append(r)
    lines = [
        "| RUNTIME_THREADS | LOADER_PROCESSES | jobs | failed | images/s (each run) | "
        "median images/s | worker CPU ms per image | machine CPU ms per image | "
        "cores used outside the benchmark |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (threads, loaders), runs in by_point.items():
        rates = [r["images_per_s"] for r in runs]
        label = f"0 (OpenVINO's choice: {result['cores']})" if threads == 0 else str(threads)
        lines.append(
            f"| {label} | {loaders} | {sum(r['jobs'] for r in runs)} | "
            f"{sum(r['failed'] for r in runs)} | {', '.join(fmt(x) for x in rates)} | "
            f"**{fmt(statistics.median(rates))}** | "
            f"{fmt(statistics.median(r['worker_cpu_ms'] for r in runs))} | "
            f"{fmt(statistics.median(r['machine_cpu_ms'] for r in runs))} | "
            f"{', '.join(fmt(r['other_cores'], 2) for r in runs)} |"
        )
    info = machine_info()
    lines += [
        "",
        f"`python -m bench.runtime_threads`, {info['nproc']} cores, {info['cpu_model']}: "
        "bulk end to end (`bench/end_to_end.py`), the worker restarted for each point; "
        "load average after each run: " + "; ".join(r["load"] for r in result["runs"]) + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    result = run(args.quick, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(report(result))
    return 1 if any(r["failed"] or r["succeeded"] != r["jobs"] for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
