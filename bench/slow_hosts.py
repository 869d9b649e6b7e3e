"""Issue #23 item 5: one user's batch of dripping URLs against another user's single job.

A server answers every request with its response one byte a second (no read ever
times out; only FETCH_TIMEOUT_S ends a fetch). One user posts a batch of ``--drips``
such URLs; once the worker is fetching them, another user submits single jobs for
ordinary photos, one after another, and then a batch of 32. Each single job's
submit-to-done time is compared with the same on the idle worker (before the drips).

``python -m bench.slow_hosts [--drips 400] [--loader-processes 2] [--fetch-threads 16]
[--runtime null]``: prints idle and loaded latencies. ``--drips 0`` is the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench.common import (
    DripServer,
    ServiceStack,
    loadavg,
    machine,
    single_job_seconds,
    wait_done,
)

SINGLE_JOBS = 5
OTHER_BATCH = 32


# An image host that sends its response one byte a second, for ever.
DRIP_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 99999\r\n\r\n"
DRIP_BODY = b"\xff" * 99999


def _single(stack: ServiceStack, url: str) -> float:
    return single_job_seconds(stack, stack.user(1), url)


def _batch(stack: ServiceStack, urls: list[str]) -> float:
    user = stack.user(len(urls))
    start = time.monotonic()
    stack.post_batch(user, "\n".join(urls)).raise_for_status()
    wait_done(stack.dsn, "user_id = %s", (user["id"],), len(urls), timeout=600, interval=0.05)
    return time.monotonic() - start


def measure(drips: int, loader_processes: int, fetch_threads: int, runtime: str) -> dict:
    overrides = {"loader_processes": str(loader_processes), "fetch_threads": fetch_threads}
    with (
        DripServer(DRIP_HEAD, DRIP_BODY) as server,
        ServiceStack(runtime=runtime, **overrides) as stack,
    ):
        urls = stack.urls(2 * SINGLE_JOBS + OTHER_BATCH)
        idle = [_single(stack, url) for url in urls[:SINGLE_JOBS]]
        if drips:
            attacker = stack.user(drips)
            text = "\n".join(f"{server.base_url}/drip{i}.jpg" for i in range(drips))
            stack.post_batch(attacker, text).raise_for_status()
            deadline = time.monotonic() + 30
            seen = -1  # until the fetches in flight stop growing
            while time.monotonic() < deadline and len(server.hits) != seen:
                seen = len(server.hits)
                time.sleep(1.0)
        in_flight = len(server.hits)
        loaded = [_single(stack, url) for url in urls[SINGLE_JOBS : 2 * SINGLE_JOBS]]
        batch_s = _batch(stack, urls[2 * SINGLE_JOBS :])
        dripping = len(server.hits) - in_flight  # drips started meanwhile
    return {
        "drips": drips,
        "drip_fetches_in_flight": in_flight,
        "drip_fetches_started_while_measuring": dripping,
        "loader_processes": loader_processes,
        "fetch_threads": fetch_threads,
        "idle_single_s": [round(s, 2) for s in idle],
        "single_s": [round(s, 2) for s in loaded],
        "single_median_s": round(statistics.median(loaded), 2),
        "single_max_over_idle_s": round(max(loaded) - statistics.median(idle), 2),
        "other_batch_of_32_s": round(batch_s, 2),
        "machine": machine(),
        "loadavg": loadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drips", type=int, default=400)
    parser.add_argument("--loader-processes", type=int, default=2)
    parser.add_argument("--fetch-threads", type=int, default=16)
    parser.add_argument("--runtime", default="null", help="null: no model work (cheap)")
    args = parser.parse_args()
    result = measure(args.drips, args.loader_processes, args.fetch_threads, args.runtime)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
