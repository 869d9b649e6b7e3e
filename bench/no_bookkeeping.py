"""The best one-process pipeline for the service's work, with none of its bookkeeping.

What a competent engineer would write to classify a list of URLs as fast as one
machine allows, and the denominator of the service's efficiency (``bench.efficiency``):
``LOADERS`` loader threads, each with its own keep-alive ``requests.Session``, fetch,
decode (JPEG at a reduced DCT scale, ``Image.draft``) and resize to the model's input;
the main thread runs batches of ``BATCH`` through the model while the loaders fill
the next one (Pillow's decode and the runtime's forward pass release the GIL). No
accounts, tokens, SQL, queue, retries or pixel budget. The model is the service's:
``ModelRegistry(Config.from_env())``, so ``RUNTIME`` (default ``auto``: OpenVINO fp32
on a CPU) and ``RUNTIME_THREADS`` pick what runs it exactly as in the worker.

``run_waiting`` is the same pipeline for clients that each wait for their answer before
sending the next image, as the service's singles with wait do: a batch holds what is
loaded when the model is free (up to ``BATCH``). It is the reference for a service's
``CLIENTS`` waiting clients on this machine: their closed loop keeps batches small.

    python -m bench.no_bookkeeping [--quick]   # its own photo server; prints one round
    python -m bench.no_bookkeeping --serve     # rounds on request (bench.efficiency)

``--serve`` prints ``{"ready": ...}`` on one line once the model is set up and warm,
then answers each line ``{"urls": [...]}`` on stdin with one line of results
(``{"urls": [...], "clients": N}``: ``run_waiting`` with N clients).
"""

from __future__ import annotations

import argparse
import io
import json
import queue
import sys
import threading
import time

import numpy as np
import requests
from PIL import Image

LOADERS = 3
BATCH = 16
N_IMAGES = 1000
CLIENTS = 16  # bench.end_to_end's waiting clients


def load(session: requests.Session, url: str, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 (height, width, 3): fetch, decode small, resize bilinear."""
    resp = session.get(url, timeout=30)
    resp.raise_for_status()
    with Image.open(io.BytesIO(resp.content)) as image:
        if image.format == "JPEG":
            image.draft("RGB", size)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale
        rgb = image.convert("RGB")
    return np.asarray(rgb.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


class Pipeline:
    """Loader threads feeding batches to one model; one ``run(urls)`` at a time."""

    def __init__(self, model, loaders: int = LOADERS, batch: int = BATCH) -> None:
        self.model = model
        self.batch = batch
        # One keep-alive session per loader thread, kept across rounds.
        self.sessions = [requests.Session() for _ in range(loaders)]

    def _loader(self, session: requests.Session, todo: queue.SimpleQueue, done: queue.Queue):
        while True:
            try:
                url = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put(load(session, url, self.model.input_size))
            except Exception as exc:  # counted: one bad URL must not stop the round
                done.put(exc)

    def run(self, urls: list[str]) -> dict:
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for url in urls:
            todo.put(url)
        done: queue.Queue = queue.Queue(maxsize=4 * self.batch)  # loaders run a little ahead
        cpu0, t0 = time.process_time(), time.perf_counter()
        threads = [
            threading.Thread(target=self._loader, args=(s, todo, done), daemon=True)
            for s in self.sessions
        ]
        for t in threads:
            t.start()
        ok = failed = batches = 0
        forward_s = 0.0
        pending: list[np.ndarray] = []
        for received in range(1, len(urls) + 1):
            item = done.get()
            if isinstance(item, Exception):
                failed += 1
            else:
                pending.append(item)
            if pending and (len(pending) == self.batch or received == len(urls)):
                f0 = time.perf_counter()
                probs = self.model.predict_batch(np.stack(pending).astype(np.float32))
                forward_s += time.perf_counter() - f0
                ok += int(np.sum(np.isfinite(probs).all(axis=1)))
                batches += 1
                pending = []
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        for t in threads:
            t.join()
        return _result(len(urls), ok, failed, wall, cpu, batches, forward_s)

    def run_waiting(self, urls: list[str], clients: int = CLIENTS) -> dict:
        """``clients`` threads, each sending its next URL when its previous one has an
        answer; the loaders load what is sent, and the model takes every loaded image
        waiting when it is free (up to ``batch``)."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for url in urls:
            todo.put(url)
        sent: queue.SimpleQueue = queue.SimpleQueue()  # (url, the client's answer event)
        loaded: queue.Queue = queue.Queue()  # (array or exception, answer event)

        def client() -> None:
            answered = threading.Event()
            while True:
                try:
                    url = todo.get_nowait()
                except queue.Empty:
                    return
                answered.clear()
                sent.put((url, answered))
                answered.wait()

        def loader(session: requests.Session) -> None:
            while (item := sent.get()) is not None:
                url, answered = item
                try:
                    loaded.put((load(session, url, self.model.input_size), answered))
                except Exception as exc:  # counted: one bad URL must not stop the round
                    loaded.put((exc, answered))

        cpu0, t0 = time.process_time(), time.perf_counter()
        loaders = [threading.Thread(target=loader, args=(s,), daemon=True) for s in self.sessions]
        senders = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in loaders + senders:
            t.start()
        ok = failed = batches = done = 0
        forward_s = 0.0
        while done < len(urls):
            taken = [loaded.get()]
            while len(taken) < self.batch and not loaded.empty():
                taken.append(loaded.get_nowait())
            good = [(a, e) for a, e in taken if not isinstance(a, Exception)]
            failed += len(taken) - len(good)
            if good:
                f0 = time.perf_counter()
                probs = self.model.predict_batch(np.stack([a for a, _ in good]).astype(np.float32))
                forward_s += time.perf_counter() - f0
                ok += int(np.sum(np.isfinite(probs).all(axis=1)))
                batches += 1
            done += len(taken)
            for _, event in taken:
                event.set()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        for _ in loaders:
            sent.put(None)
        for t in loaders + senders:
            t.join()
        out = _result(len(urls), ok, failed, wall, cpu, batches, forward_s)
        return {**out, "clients": clients, "mean_batch": len(urls) / max(1, batches)}


def _result(images, ok, failed, wall, cpu, batches, forward_s) -> dict:
    return {
        "images": images,
        "ok": ok,
        "failed": failed,
        "wall_s": wall,
        "images_per_s": ok / wall if wall else 0.0,
        "cpu_ms_per_image": 1000 * cpu / max(1, ok),
        "cores": cpu / wall if wall else 0.0,
        "batches": batches,
        "model_busy": forward_s / wall if wall else 0.0,
    }


def build_model():
    """The service's default model, set up and warmed exactly as a worker does it."""
    from bench.common import ensure_keras_home
    from shared.config import Config
    from worker.models import ModelRegistry

    ensure_keras_home()
    config = Config.from_env()
    model = ModelRegistry(config).get(config.default_model)
    model.setup()
    width, height = model.input_size
    model.predict_batch(np.zeros((BATCH, height, width, 3), dtype=np.float32))
    return model


def describe(model) -> dict:
    compiled = getattr(model, "_compiled", None)
    return {
        "model": model.name,
        "runtime": str(model.choice),
        "runtime_threads": getattr(compiled, "threads", None),
        "loaders": LOADERS,
        "batch": BATCH,
    }


def serve() -> None:
    pipeline = Pipeline(build_model())
    print(json.dumps({"ready": describe(pipeline.model)}), flush=True)
    for line in sys.stdin:
        if line.strip():
            asked = json.loads(line)
            if asked.get("clients"):
                result = pipeline.run_waiting(asked["urls"], asked["clients"])
            else:
                result = pipeline.run(asked["urls"])
            print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="rounds on request (stdin)")
    parser.add_argument("--quick", action="store_true", help=f"{4 * BATCH} images")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return
    from bench.common import PhotoServerProcess, photo_urls

    pipeline = Pipeline(build_model())
    photos = PhotoServerProcess().start()
    try:
        pipeline.run(photo_urls(photos.base_url, 2 * BATCH, "warm"))
        n = 4 * BATCH if args.quick else N_IMAGES
        result = pipeline.run(photo_urls(photos.base_url, n, "round"))
    finally:
        photos.stop()
    print(json.dumps({**describe(pipeline.model), **result}, indent=1))


if __name__ == "__main__":
    main()
