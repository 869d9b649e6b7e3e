"""(5) The alternative: the seed apps' design (bench/seed_app.py) under the same load.

A Flask app that runs ``model.predict_on_batch`` on one image per request (the
strongest simple synchronous app; ``model.predict``, as the seed apps call it, is a
third, slower row), with the same MobileNet, on the same machine, driven by the same
16 concurrent clients sending URLs of the same real photos (each client sends its next
request when it has the previous answer). It runs under gunicorn in two shapes one
would reasonably pick on 2 cores, and the best row is what the service is compared with:

* 1 process x 4 threads (gthread): one model copy using both cores through
  TensorFlow's own thread pool; the threads overlap downloads and decoding with
  the forward pass of another request;
* 2 processes x 1 thread (sync): one process per core, two model copies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid

import requests

from bench.common import (
    OUTPUT,
    ROOT,
    PhotoServerProcess,
    closed_loop,
    ensure_keras_home,
    fmt,
    free_port,
    latency_summary,
    main_json,
    photo_urls,
    stop_process,
    wait_http,
)
from harness import waiting

N_REQUESTS = 1000
CLIENTS = 16
GTHREAD = {"name": "1 process x 4 threads (gthread)", "workers": 1, "threads": 4}
SYNC = {"name": "2 processes x 1 thread (sync)", "workers": 2, "threads": 1}
SHAPES = (
    {**GTHREAD, "class": "gthread", "predict": "predict_on_batch"},
    {**SYNC, "class": "sync", "predict": "predict_on_batch"},
    {**GTHREAD, "class": "gthread", "predict": "predict"},  # the seed apps' own call
)


def serve(shape: dict, ready_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        # --config: not the service's gunicorn.conf.py (gunicorn reads ./gunicorn.conf.py
        # by default): the seed app is a plain Flask app with gunicorn's own defaults.
        sys.executable, "-m", "gunicorn", "--config", os.devnull, "--bind", f"127.0.0.1:{port}",
        "--workers", str(shape["workers"]), "--threads", str(shape["threads"]),
        "--worker-class", shape["class"], "--timeout", "120", "bench.seed_app:app",
    ]  # fmt: skip
    OUTPUT.mkdir(parents=True, exist_ok=True)
    log_path = OUTPUT / f"bench-seed-{port}.log"
    env = {**os.environ, "SEED_READY_DIR": ready_dir, "SEED_PREDICT": shape["predict"]}
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc, log_path, timeout=180)
    waiting.wait_for(lambda: len(os.listdir(ready_dir)) >= shape["workers"], 180, "seed workers")
    return proc, url


def drive(url: str, urls: list[str]) -> dict:
    def call(session: requests.Session, image_url: str) -> bool:
        resp = session.post(f"{url}/predict", json={"url": image_url}, timeout=120)
        return resp.status_code == 200 and "predicted_class" in resp.json()

    return closed_loop(CLIENTS, urls, call)


def run(quick: bool = False, shapes: tuple[dict, ...] | None = None, n: int | None = None) -> dict:
    """Every shape (quick: the first) or ``shapes``, ``n`` requests each."""
    ensure_keras_home()
    n = n or (24 if quick else N_REQUESTS)
    shapes = shapes or (SHAPES[:1] if quick else SHAPES)
    photos = PhotoServerProcess().start()
    rows = []
    try:
        for shape in shapes:
            with tempfile.TemporaryDirectory() as ready_dir:
                proc, url = serve(shape, ready_dir)
                try:
                    drive(url, photo_urls(photos.base_url, 2 * CLIENTS, "warm"))
                    tag = uuid.uuid4().hex[:8]
                    driven = drive(url, photo_urls(photos.base_url, n, tag))
                finally:
                    stop_process(proc)
            rows.append(
                {
                    **shape,
                    "requests": n,
                    "ok": driven["ok"],
                    "failed": driven["failed"],
                    "wall_s": driven["wall_s"],
                    "images_per_s": driven["ok"] / driven["wall_s"],
                    **latency_summary(driven["latencies"]),
                }
            )
            time.sleep(1)
    finally:
        photos.stop()
    best = max(rows, key=lambda r: r["images_per_s"])
    return {"clients": CLIENTS, "rows": rows, "best": best}


def report(result: dict) -> str:
    lines = [
        "| gunicorn shape | model call | requests | ok | failed | seconds | images/s | p50 ms "
        "| p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        call = r.get("predict", "predict")  # results saved before the column existed
        lines.append(
            f"| {r['name']} | `{call}` | {r['requests']} | {r['ok']} | {r['failed']} | "
            f"{fmt(r['wall_s'], 2)} | **{fmt(r['images_per_s'])}** | {fmt(r['p50_ms'], 0)} | "
            f"{fmt(r['p99_ms'], 0)} |"
        )
    lines += [
        "",
        f'{result["clients"]} closed-loop clients, JSON `{{"url": ...}}` per request over '
        "the same photo server and photos as (3); the app is `bench/seed_app.py` "
        "(a batch of one per request, top-1 label); the best row is the baseline the "
        "targets use.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
