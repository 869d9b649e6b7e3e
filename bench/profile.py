"""Where the worker's Python time goes: py-spy on the worker during a bulk batch.

Runs after the measured sections (the profiler's own cost never touches a reported
throughput). ``py-spy record --gil`` samples only threads holding the GIL, so the
shares below are of the worker's *Python* time: work that competes for one core's
worth of interpreter, beside TensorFlow's own C++ threads (which py-spy does not
see; a forward pass shows here only as the Python around ``predict_on_batch``).
Optional: skipped when py-spy is not installed (``pip install py-spy``).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import ServiceStack, fmt, py_spy, wait_done

RATE_HZ = 100
# Most batches one profile posts (the user is funded for them).
MAX_BATCHES = 1000
# Leaf first: a sample belongs to the first category one of its frames matches.
CATEGORIES = (
    ("model (Keras/TensorFlow Python side)", ("predict_on_batch", "tensorflow/", "keras/")),
    ("decode + resize (Pillow, numpy)", ("PIL/", "decode_image", "to_array", "shared/images")),
    ("fetch URLs (requests, urllib3, sockets)", ("worker/fetch", "requests/", "urllib3/")),
    ("SQL (SQLAlchemy, psycopg)", ("sqlalchemy/", "psycopg/")),
    ("Redis (uploads, notifications, metrics)", ("redis/",)),
    ("Celery, kombu, billiard (messages)", ("celery/", "kombu/", "billiard/", "celery_batches/")),
)


def categorize(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, patterns in CATEGORIES:
            if any(p in frame for p in patterns):
                return name
    return "other Python"


def summarize(path: Path) -> dict:
    by_cat: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        by_cat[categorize(stack)] += n
    return {"samples": total, "categories": dict(by_cat.most_common())}


def run_with(stack: ServiceStack, jobs: int, quick: bool = False) -> dict | None:
    spy_bin = py_spy()
    if not spy_bin:
        return None
    seconds = 3 if quick else 15
    # Made before the recording: a user (a bcrypt hash) and the URLs are not the worker's.
    user = stack.user(jobs * MAX_BATCHES)
    text = "\n".join(stack.urls(jobs))
    out = Path(tempfile.mkstemp(suffix=".txt", prefix="bench-pyspy-")[1])
    cmd = [
        spy_bin, "record", "--pid", str(stack.worker_pid()), "--subprocesses", "--gil",
        "--nonblocking", "--rate", str(RATE_HZ), "--duration", str(seconds), "--format", "raw",
        "--output", str(out),
    ]  # fmt: skip
    try:
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start, batches = time.monotonic(), 0
        # Batches one after another until the recording ends: with --gil a worker that
        # holds no GIL gives no samples, and py-spy then writes an empty file and exits 0.
        # end_to_end.bulk is not used here: its metrics reads wait for the worker's next
        # flush, about 2 s of each call with the worker idle, and a quick run's 3 s
        # recording once held no sample (fresh-clone CI, session 16).
        while spy.poll() is None or batches == 0:
            resp = stack.post_batch(user, text)
            resp.raise_for_status()
            wait_done(stack.dsn, "batch_id = %s", (resp.json()["id"],), jobs, 60 + jobs)
            batches += 1
        images_per_s = batches * jobs / (time.monotonic() - start)
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not out.stat().st_size:
            raise RuntimeError(f"py-spy failed: {err[-500:]}")
        summary = summarize(out)
    finally:
        out.unlink(missing_ok=True)
    return {
        **summary,
        "seconds": seconds,
        "rate_hz": RATE_HZ,
        "jobs": jobs,
        "batches": batches,
        "images_per_s": images_per_s,
    }


def report(result: dict | None) -> str:
    if not result:
        return "py-spy is not installed; no profile."
    possible = result["seconds"] * result["rate_hz"]
    lines = [
        "| worker Python time (GIL held) | share of samples | cores' worth |",
        "|---|---|---|",
    ]
    for name, n in result["categories"].items():
        lines.append(f"| {name} | {100 * n / result['samples']:.0f}% | {fmt(n / possible, 2)} |")
    lines += [
        "",
        f"`py-spy record --gil --subprocesses` at {result['rate_hz']} Hz for "
        f"{result['seconds']} s on the worker (main and pool process) during separate bulk "
        f"batches of {result['jobs']} URL jobs, one after another until the recording ended "
        f"({result.get('batches', 1)}, {fmt(result['images_per_s'])} images/s while "
        f"profiled, not a reported measurement). {result['samples']} samples with the GIL "
        f"held out of {possible} possible per process: *cores' worth* is how much of one "
        "core each part kept busy in Python.",
    ]
    return "\n".join(lines)
