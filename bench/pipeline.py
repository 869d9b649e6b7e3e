"""(2) The worker pipeline alone: ``worker.pipeline.process(rt, job_ids)`` called directly.

The same function a Celery pool process runs for a batch, without Celery: claim the
jobs in SQL, fetch URLs from a local HTTP server (half the jobs) and read uploads
from Redis (the other half) concurrently, decode, resize, one forward pass, write
results and refunds in one transaction, publish "done". Jobs are submitted
beforehand through the real API (in-process) on a fresh PostgreSQL database; only
``process`` is timed. BATCH_MAX is 64 here so every batch size is one forward pass.

Then the same with two batches in flight, as the worker's default threads pool runs
them (WORKER_CONCURRENCY=2): two threads call ``process`` on successive batches, so
one loads its images or writes its results while the other runs the forward pass.
"""

from __future__ import annotations

import io
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from bench.common import (
    PHOTOS,
    PhotoServerProcess,
    ensure_keras_home,
    fmt,
    funded_user,
    job_counts,
    libpq_dsn,
    main_json,
    median,
    photo_names,
    photo_urls,
)
from harness import databases, stack_config

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
OVERLAP_SIZES = (8, 16, 32, 64)
OVERLAP_IMAGES = 256  # per batch size
# worker.pipeline's public stage functions, and the keys of their times in the results:
# the keys keep the names recorded runs have (bench/run_all.py reads them, also from a
# saved run's raw results).
STAGES = {
    "claim": "_claim",
    "load_inputs": "_load_inputs",
    "predict": "_predict",
    "write": "_write",
    "announce": "_announce",
}


def repeats(batch_size: int, quick: bool) -> int:
    if quick:
        return 2
    return max(3, min(12, 128 // batch_size))


class StageTimer:
    """Wraps the pipeline's public stage functions to time them (those that exist)."""

    def __init__(self, module) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.module = module
        for name, key in STAGES.items():
            fn = getattr(module, name, None)
            if callable(fn):
                setattr(module, name, self._wrap(key, fn))

    def _wrap(self, key, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[key] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def submit_jobs(client, user: dict, urls: list[str], uploads: list[tuple[str, bytes]]) -> list:
    ids = []
    for url in urls:
        resp = client.post("/v1/jobs", json={"url": url}, headers=user["headers"])
        assert resp.status_code == 202, resp.get_json()
        ids.append(resp.get_json()["id"])
    for name, data in uploads:
        resp = client.post(
            "/v1/jobs",
            data={"file": (io.BytesIO(data), name)},
            content_type="multipart/form-data",
            headers=user["headers"],
        )
        assert resp.status_code == 202, resp.get_json()
        ids.append(resp.get_json()["id"])
    return ids


def submit_batch(client, user: dict, photos, photo_bytes: list, size: int, offset: int) -> list:
    """``size`` jobs: the first half URLs on the photo server, the rest uploads."""
    n_url = (size + 1) // 2
    urls = photo_urls(photos.base_url, n_url, uuid.uuid4().hex[:8])
    uploads = [photo_bytes[(offset + i) % len(photo_bytes)] for i in range(size - n_url)]
    return submit_jobs(client, user, urls, uploads)


def run(quick: bool = False) -> dict:
    ensure_keras_home()
    from api import create_app
    from worker import pipeline
    from worker.runtime import Runtime

    sizes = (8,) if quick else BATCH_SIZES
    names = photo_names()
    photo_bytes = [(n, (PHOTOS / n).read_bytes()) for n in names]
    db_url = databases.create_postgres_database()
    photos = PhotoServerProcess().start()
    config = None
    rows = []
    try:
        config = databases.migrated(
            stack_config.test_config(db_url, batch_max=max(64, max(sizes)), log_level="WARNING")
        )
        app = create_app(config)
        client = app.test_client()
        user = funded_user(app, 100_000)
        rt = Runtime.build(config)
        timer = StageTimer(pipeline)
        dsn = libpq_dsn(db_url)
        for bs in sizes:
            times, stage_sums, cpu_total = [], defaultdict(float), 0.0
            n_reps = repeats(bs, quick)
            for rep in range(n_reps + 1):  # rep 0 warms up this batch size's bucket
                ids = submit_batch(client, user, photos, photo_bytes, bs, rep)
                timer.take()
                cpu_start = time.process_time()
                start = time.perf_counter()
                outcome = pipeline.process(rt, ids)
                elapsed = time.perf_counter() - start
                cpu = time.process_time() - cpu_start
                stages = timer.take()
                counts, _ = job_counts(dsn, "id = ANY(%s)", (ids,))
                if outcome is not None or counts.get("succeeded", 0) != bs:
                    raise RuntimeError(f"batch of {bs}: outcome {outcome!r}, jobs {counts}")
                if rep == 0:
                    continue
                times.append(elapsed)
                cpu_total += cpu
                for k, v in stages.items():
                    stage_sums[k] += v
            batch_s = median(times)
            rows.append(
                {
                    "batch_size": bs,
                    "batch_ms": batch_s * 1000,
                    "images_per_s": bs / batch_s,
                    "repeats": len(times),
                    "cpu_ms_per_image": cpu_total * 1000 / (bs * len(times)),
                    "stage_ms": {k: v * 1000 / len(times) for k, v in stage_sums.items()},
                }
            )
        overlapped = [
            _overlapped(pipeline, rt, client, user, photos, photo_bytes, dsn, bs, quick)
            for bs in ((8,) if quick else OVERLAP_SIZES)
        ]
    finally:
        photos.stop()
        if config:
            databases.delete_redis_prefix(config.queue_prefix)
        databases.drop_postgres_database(db_url)
    best = max(rows, key=lambda r: r["images_per_s"])
    return {
        "model": config.default_model,
        "rows": rows,
        "best": best,
        "overlapped": overlapped,
        "best_overlapped": max(overlapped, key=lambda r: r["images_per_s"]),
    }


def _overlapped(pipeline, rt, client, user, photos, photo_bytes, dsn, bs, quick) -> dict:
    """Two threads calling ``process`` on successive batches of ``bs`` (the threads pool)."""
    n_batches = 4 if quick else max(4, OVERLAP_IMAGES // bs)
    batches = []
    for i in range(n_batches + 2):  # the first two warm up
        batches.append(submit_batch(client, user, photos, photo_bytes, bs, i))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda ids: pipeline.process(rt, ids), batches[:2]))
        start = time.perf_counter()
        outcomes = list(pool.map(lambda ids: pipeline.process(rt, ids), batches[2:]))
        elapsed = time.perf_counter() - start
    ids = [i for b in batches[2:] for i in b]
    counts, _ = job_counts(dsn, "id = ANY(%s)", (ids,))
    if any(o is not None for o in outcomes) or counts.get("succeeded", 0) != len(ids):
        raise RuntimeError(f"overlapped batches of {bs}: {outcomes}, jobs {counts}")
    return {"batch_size": bs, "batches": n_batches, "images_per_s": len(ids) / elapsed}


def report(result: dict) -> str:
    lines = [
        "| batch size | ms per batch | images/s | CPU ms per image | claim | fetch+decode+resize "
        "| forward | write | announce | model busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s = r["stage_ms"]
        lines.append(
            f"| {r['batch_size']} | {fmt(r['batch_ms'])} | {fmt(r['images_per_s'])} | "
            f"{fmt(r.get('cpu_ms_per_image'))} | "
            + " | ".join(fmt(s.get(k)) for k in STAGES.values())
            + f" | {100 * s.get('_predict', 0) / r['batch_ms']:.0f}% |"
        )
    best = result["best"]
    lines += [
        "",
        f"Model `{result['model']}`; half the jobs are URLs fetched from a local HTTP server, "
        "half are uploads read from Redis, over the 11 real photos (JPEG and BMP, 140 KB to "
        "1.4 MB, 0.16 to 1.2 megapixels). Stage columns are milliseconds per batch spent in "
        "`worker.pipeline`'s stage functions (mean over the timed repeats); CPU is this "
        "process's (fetch threads, decoding and TensorFlow's threads), not the photo "
        "server's, PostgreSQL's or Redis's. *Model busy* is the forward pass's share of the "
        "batch's wall time (on a GPU host: the fraction of time the accelerator has work). "
        f"Best: **{fmt(best['images_per_s'])} images/s** at batch size {best['batch_size']}.",
    ]
    overlapped = result.get("overlapped")
    if overlapped:
        by_size = {r["batch_size"]: r for r in result["rows"]}
        lines += [
            "",
            "Two batches in flight (the worker's threads pool, WORKER_CONCURRENCY=2):",
            "",
            "| batch size | batches | images/s | vs one at a time |",
            "|---|---|---|---|",
        ]
        for r in overlapped:
            alone = by_size.get(r["batch_size"])
            ratio = f"{r['images_per_s'] / alone['images_per_s']:.2f}x" if alone else "n/a"
            lines.append(
                f"| {r['batch_size']} | {r['batches']} | **{fmt(r['images_per_s'])}** | {ratio} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
