"""What the job-done listener costs per finished job, per API process (issue #22).

With one pattern subscription per API process (``shared.events.DoneListener`` before
issue #22), each one heard every finished job, bulk ones too; now only the processes
registered under a job do. Here ``SUBSCRIBERS`` processes each run a ``DoneListener``
kept alive by one waiter on a job that never finishes (so they wait on none of the
published jobs), and this process publishes finishes as the worker's announce does
(``publish_done``):

* ``bulk``: batches of 32, back to back: the listener reads many messages per wake-up;
* ``singles``: one finish every 5 ms (``GAP_S``), as singles finish: one wake-up each.

Reported: CPU µs per finished job of each listener process and of the Redis server
(both from /proc), and Redis's with no subscriber, side by side in one run.

``python -m bench.listener [--quick] [--json PATH]``. The machine may be shared: numbers
are as measured.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import cpu_seconds, fmt, main_json, median

SUBSCRIBERS = (0, 4)  # no listener, and WEB_CONCURRENCY's default here
GAP_S = 0.005
MODES = {"bulk": (32, 0.0, 50_000), "singles": (1, GAP_S, 3_000)}  # batch, gap, jobs

_CHILD = """
import sys, threading, time
import redis
from harness import stack_config
from shared.events import DoneListener
config = stack_config.test_config("sqlite://", queue_prefix=sys.argv[1])
listener = DoneListener(redis.Redis.from_url(config.redis_url), config)
threading.Thread(target=listener.wait, args=("nobody", 3600, lambda: False), daemon=True).start()
assert listener.listening.wait(30)
time.sleep(0.5)  # the subscription's confirmation (the bench then runs for seconds)
print("ready", flush=True)
sys.stdin.readline()
"""


def _publish(subscribers: int, batch: int, gap_s: float, n: int) -> dict:
    import redis

    from harness import databases, stack_config
    from shared.events import publish_done
    from shared.models import new_id

    config = stack_config.test_config("sqlite://")
    client = redis.Redis.from_url(config.redis_url)
    redis_pid = int(client.info("server")["process_id"])
    kids = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, config.queue_prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(subscribers)
    ]
    try:
        for kid in kids:
            assert kid.stdout is not None and kid.stdout.readline().strip() == "ready"
        ids = [new_id() for _ in range(n)]
        before = [cpu_seconds(k.pid) for k in kids], cpu_seconds(redis_pid)
        for i in range(0, n, batch):
            publish_done(client, config, ids[i : i + batch])
            if gap_s:
                time.sleep(gap_s)
        time.sleep(1.0)  # the listeners drain what is left
        after = [cpu_seconds(k.pid) for k in kids], cpu_seconds(redis_pid)
    finally:
        for kid in kids:
            assert kid.stdin is not None
            kid.stdin.write("\n")
            kid.stdin.flush()
            kid.wait(30)
        databases.delete_redis_prefix(config.queue_prefix)
    listeners = [1e6 * (b - a) / n for a, b in zip(before[0], after[0], strict=True)]
    return {
        "subscribers": subscribers,
        "jobs": n,
        "listener_us_per_job_per_process": median(listeners) if listeners else None,
        "redis_us_per_job": 1e6 * (after[1] - before[1]) / n,
    }


def run(quick: bool = False) -> dict:
    out = {}
    for mode, (batch, gap_s, n) in MODES.items():
        n = n // 10 if quick else n
        out[mode] = [_publish(s, batch, gap_s, n) for s in SUBSCRIBERS]
    return out


def report(result: dict) -> str:
    lines = [
        "| finishes | listener processes | jobs | CPU µs per job, each listener (median) "
        "| Redis CPU µs per job |",
        "|---|---|---|---|---|",
    ]
    for mode, rows in result.items():
        for r in rows:
            lines.append(
                f"| {mode} | {r['subscribers']} | {r['jobs']} "
                f"| {fmt(r['listener_us_per_job_per_process'])} | {fmt(r['redis_us_per_job'])} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
