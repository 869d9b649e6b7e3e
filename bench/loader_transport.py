"""How loader processes hand pixels to the model process: shared-memory slots vs pickling.

A child process sends N uint8 arrays of a model's input size to its parent, one
message each, the two ways ``worker/loader_pool.py`` could: (a) the array pickled
through a ``multiprocessing`` pipe; (b) written into a slot of a shared-memory block,
with only the slot and shape through the pipe, the parent copying the pixels out
(as the pool does). Reported: wall time per image and CPU time per image in each
process (from ``time.process_time`` in each). Decode and resize are left out: only
the hand-over differs between the two.

``python -m bench.loader_transport [--quick] [--json PATH]``
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from bench.common import fmt, main_json

SIZES = {"mobilenet": (224, 224), "inception_v3": (299, 299)}
SLOTS = 64


def _child(conn, mode: str, shape: tuple, n: int, shm_name: str | None) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    shm = SharedMemory(shm_name) if shm_name else None
    slots = np.ndarray((SLOTS, pixels.size), np.uint8, buffer=shm.buf) if shm else None
    conn.recv()  # start
    start = time.process_time()
    freed = 0
    for i in range(n):
        if mode == "pickle":
            conn.send((i, pixels))
        else:
            while i - freed >= SLOTS:  # reuse a slot only once the parent copied it out
                conn.recv()
                freed += 1
            slot = i % SLOTS
            slots[slot] = pixels.reshape(-1)
            conn.send((i, slot, pixels.shape))
    conn.send(time.process_time() - start)
    del slots
    if shm:
        shm.close()


def _measure(mode: str, shape: tuple, n: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    size = int(np.prod(shape))
    shm = SharedMemory(create=True, size=SLOTS * size) if mode == "shm" else None
    slots = np.ndarray((SLOTS, size), np.uint8, buffer=shm.buf) if shm else None
    proc = ctx.Process(target=_child, args=(theirs, mode, shape, n, shm.name if shm else None))
    proc.start()
    ours.send("go")
    wall = time.perf_counter()
    cpu = time.process_time()
    for _ in range(n):
        message = ours.recv()
        if mode == "pickle":
            array = message[1]
        else:
            _, slot, got = message
            array = slots[slot].reshape(got).copy()
            ours.send(None)
        assert array.shape == shape
    parent_cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    child_cpu = ours.recv()
    proc.join()
    while ours.poll():  # acks the child did not need
        ours.recv()
    del slots
    if shm:
        shm.close()
        shm.unlink()
    return {
        "mode": mode,
        "shape": list(shape),
        "n": n,
        "wall_us": 1e6 * wall / n,
        "parent_cpu_us": 1e6 * parent_cpu / n,
        "child_cpu_us": 1e6 * child_cpu / n,
    }


def run(quick: bool = False) -> dict:
    n = 200 if quick else 5000
    rows = []
    for model, (w, h) in SIZES.items():
        for _ in range(1 if quick else 3):  # interleaved rounds; the best of each is kept
            for mode in ("pickle", "shm"):
                rows.append({"model": model, **_measure(mode, (h, w, 3), n)})
    best: dict = {}
    for row in rows:
        key = (row["model"], row["mode"])
        total = row["parent_cpu_us"] + row["child_cpu_us"]
        if key not in best or total < best[key]["parent_cpu_us"] + best[key]["child_cpu_us"]:
            best[key] = row
    return {"rows": list(best.values())}


def report(result: dict) -> str:
    lines = [
        "| model input | hand-over | µs wall per image | CPU µs per image: model process / "
        "loader | total CPU µs |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        h, w, _ = r["shape"]
        total = r["parent_cpu_us"] + r["child_cpu_us"]
        lines.append(
            f"| {r['model']} {w}x{h} uint8 | {r['mode']} | {fmt(r['wall_us'])} | "
            f"{fmt(r['parent_cpu_us'])} / {fmt(r['child_cpu_us'])} | {fmt(total)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
