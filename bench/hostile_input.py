"""Issue #14 items 2, 3 and 4, measured by hand on the real services (not part of run_all).

- slow image hosts: one user submits ten URLs whose host drips its response headers a
  byte a second (a thread of this process serves them), and once the worker has
  started fetching them another user submits one ordinary photo URL; its
  submit-to-done time, against the same job's on the idle worker, is the delay the
  slow host causes (and the ten jobs' outcome: failed with fetch_failed, refunded);

- decode memory: 12 uploads of a 6300 x 6300 16-bit grey PNG (about 80 KB each) reach
  one worker in one batch (BATCH_WAIT_MS lets the batch fill); the worker's RSS is
  sampled from /proc, its rise is the peak (sampled and VmHWM) minus the idle RSS
  before the uploads;
- hostile uploads: the API under gunicorn gets the issue's 19 MB JPEG of 4.8 million
  empty APP0 segments and 19 MB PNG of 1.6 million empty chunks, three times each;
  the time is the client's (median of five), the CPU the API processes', the memory
  their peak RSS rise; the same size of random bytes is the baseline of any upload
  that large, and the header check alone is timed in-process.

``python -m bench.hostile_input [--quick]`` (quick: 4 PNGs, no API part);
``python -m bench.hostile_input slow`` runs the slow-host part alone.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import sys
import time

import requests

from bench.common import (
    DripServer,
    MemorySampler,
    ServiceStack,
    cpu_seconds,
    main_json,
    single_job_seconds,
    status_kb,
    tree,
    wait_done,
)
from harness import images
from shared.errors import NotAnImage
from shared.image_header import probe

PNGS = 12
SIDE = 6300
SLOW_URLS = 10


# Response headers one byte a second: no read ever times out, only a deadline helps.
DRIP_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Pad: " + b"x" * 300


def slow_hosts() -> dict:
    with DripServer(DRIP_HEAD) as drips, ServiceStack() as stack:
        photo = stack.urls(3)
        idle = [single_job_seconds(stack, stack.user(1), url) for url in photo[:2]]
        attacker = stack.user(SLOW_URLS)
        start = time.monotonic()
        for i in range(SLOW_URLS):
            requests.post(
                f"{stack.api.url}/v1/jobs",
                json={"url": f"{drips.base_url}/slow{i}.jpg"},
                headers=attacker["headers"],
                timeout=60,
            ).raise_for_status()
        # Until the worker fetches all ten, or as many as it will (2 batch slots).
        deadline = time.monotonic() + 5
        while len(drips.hits) < SLOW_URLS and time.monotonic() < deadline:
            time.sleep(0.05)
        in_flight = len(drips.hits)
        other = single_job_seconds(stack, stack.user(1), photo[2])
        counts, _ = wait_done(stack.dsn, "user_id = %s", (attacker["id"],), SLOW_URLS, timeout=600)
        attack_s = time.monotonic() - start
        tokens = requests.get(
            f"{stack.api.url}/v1/me", headers=attacker["headers"], timeout=10
        ).json()["tokens"]
    return {
        "slow_urls": SLOW_URLS,
        "fetching_when_other_submitted": in_flight,
        "idle_s": round(min(idle), 2),
        "other_user_s": round(other, 2),
        "delay_s": round(other - min(idle), 2),
        "slow_jobs": counts,
        "slow_jobs_final_after_s": round(attack_s, 1),
        "attacker_tokens_after": tokens,
    }


def decode_memory(n: int) -> dict:
    with ServiceStack(batch_wait_ms=5000, batch_max=32) as stack:
        user = stack.user(n)
        data = images.png_16bit_grey(SIDE)
        pid = stack.worker_pid()
        idle_kb = sum(status_kb(p).get("VmRSS", 0) for p in tree(pid))
        cpu_before = sum(cpu_seconds(p) for p in tree(pid))
        sampler = MemorySampler({"worker": pid}, interval=0.05).start()
        start = time.monotonic()
        for i in range(n):
            resp = requests.post(
                f"{stack.api.url}/v1/jobs",
                files={"file": (f"grey{i}.png", data)},
                headers=user["headers"],
                timeout=60,
            )
            resp.raise_for_status()
        counts, _ = wait_done(stack.dsn, "user_id = %s", (user["id"],), n, timeout=600)
        elapsed = time.monotonic() - start
        cpu = sum(cpu_seconds(p) for p in tree(pid)) - cpu_before
        memory = sampler.stop()
        alive = stack.worker.proc.poll() is None
        batches = stack.worker_metrics()["batch_size_count"]
    peak_mb = max(memory["worker"]["peak_per_process_mb"].values())
    return {
        "images": n,
        "png_bytes": len(data),
        "jobs": counts,
        "batches": batches,
        "seconds": round(elapsed, 1),
        "worker_cpu_s": round(cpu, 1),
        "worker_idle_mb": round(idle_kb / 1024),
        "worker_peak_mb": round(peak_mb),
        "rss_rise_mb": round(peak_mb - idle_kb / 1024),
        "worker_alive": alive,
    }


def hostile_uploads(repeat: int = 5) -> list[dict]:
    size = 19_200_000
    files = {
        "jpeg, 4.8M empty APP0 segments": images.jpeg_segment_flood(4_800_000),
        "png, 1.6M empty chunks": images.png_chunk_flood(1_600_000),
        # The same size in bytes that are no image: what any upload this large costs.
        "baseline: random bytes": random.Random(1).randbytes(size),
    }
    rows = []
    with ServiceStack(worker=False) as stack:
        user = stack.user(0)
        api_pids = lambda: tree(stack.api.pid)  # noqa: E731

        def post(data: bytes) -> requests.Response:
            return requests.post(
                f"{stack.api.url}/v1/jobs",
                files={"file": ("hostile", data)},
                headers=user["headers"],
                timeout=120,
            )

        for _ in range(len(api_pids())):  # warm every gunicorn worker up
            post(b"not an image")
        for name, data in files.items():
            sampler = MemorySampler({"api": stack.api.pid}, interval=0.05).start()
            before = sum(status_kb(p).get("VmRSS", 0) for p in api_pids()) / 1024
            cpu_before = sum(cpu_seconds(p) for p in api_pids())
            times, answers = [], set()
            for _ in range(repeat):
                start = time.perf_counter()
                resp = post(data)
                times.append(time.perf_counter() - start)
                body = resp.json()
                answers.add((resp.status_code, (body.get("error") or {}).get("code", "accepted")))
            cpu = (sum(cpu_seconds(p) for p in api_pids()) - cpu_before) / repeat
            peak = sampler.stop()["api"]["peak_total_mb"]
            me = requests.get(f"{stack.api.url}/v1/me", headers=user["headers"], timeout=10)
            rows.append(
                {
                    "file": name,
                    "bytes": len(data),
                    "answers": sorted(answers),
                    "median_s": round(statistics.median(times), 3),
                    "api_cpu_s_per_request": round(cpu, 3),
                    "probe_ms": round(_probe_ms(data), 2),
                    "api_rss_rise_mb": round(peak - before),
                    "tokens_after": me.json()["tokens"],
                }
            )
    return rows


def _probe_ms(data: bytes) -> float:
    """The header check alone, in this process: the best of five."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        with contextlib.suppress(NotAnImage):
            probe(data)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def run_slow(quick: bool = False) -> dict:
    return {"slow": slow_hosts()}


def run(quick: bool = False) -> dict:
    return {
        "slow": slow_hosts(),
        "decode": decode_memory(4 if quick else PNGS),
        "uploads": [] if quick else hostile_uploads(),
    }


def report(result: dict) -> str:
    lines = []
    if "slow" in result:
        s = result["slow"]
        lines.append(
            f"{s['slow_urls']} URLs dripping headers (1 byte/s), "
            f"{s['fetching_when_other_submitted']} being fetched: another user's job "
            f"{s['other_user_s']} s (idle {s['idle_s']} s), delay {s['delay_s']} s; "
            f"slow jobs {s['slow_jobs']} after {s['slow_jobs_final_after_s']} s, "
            f"attacker's tokens after: {s['attacker_tokens_after']}"
        )
    if "decode" not in result:
        return "\n".join(lines)
    d = result["decode"]
    lines += [
        f"{d['images']} PNGs {SIDE}x{SIDE} 16-bit grey ({d['png_bytes']} bytes each): "
        f"jobs {d['jobs']} in {d['batches']:g} batch(es), {d['seconds']} s "
        f"({d['worker_cpu_s']} CPU s); worker RSS "
        f"{d['worker_idle_mb']} MB idle, {d['worker_peak_mb']} MB peak, "
        f"rise {d['rss_rise_mb']} MB; alive afterwards: {d['worker_alive']}",
    ]
    for row in result["uploads"]:
        lines.append(
            f"{row['file']} ({row['bytes']} bytes): {row['answers']}, "
            f"median {row['median_s']} s, API CPU {row['api_cpu_s_per_request']} s a request, "
            f"probe {row['probe_ms']} ms, API RSS +{row['api_rss_rise_mb']} MB, "
            f"tokens after: {row['tokens_after']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "slow" in args:
        args.remove("slow")
        main_json(run_slow, args)
    else:
        main_json(run, args)
