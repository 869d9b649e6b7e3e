"""(1) The limit: raw model throughput in-process, ``predict_on_batch`` on preprocessed arrays.

No fetching, decoding, resizing, SQL or queue: the fastest the model itself runs on
this machine at each batch size. Every other number is compared with this one.
MobileNet and MobileNetV2 use the real weights from the Keras cache; InceptionV3's
are not on this offline machine, so it runs with random weights (same speed).
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import ensure_keras_home, fmt, has_weights, main_json, median

MODELS = ("mobilenet", "mobilenet_v2", "inception_v3")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
WEIGHT_FILES = {
    "mobilenet": "mobilenet_7_5_224_tf.h5",
    "mobilenet_v2": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
    "inception_v3": "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
}
MIN_SECONDS = 2.0  # per batch size: repeat until this much time is measured
MIN_REPEAT = 3


def build(name: str, max_batch: int):
    from worker.models import BUILTIN_MODELS

    weights = "imagenet" if has_weights(WEIGHT_FILES[name]) else None
    model = BUILTIN_MODELS[name](weights=weights, max_batch=max_batch)
    model.setup()
    return model, weights or "random"


def measure(model, batch_size: int, min_seconds: float, min_repeat: int) -> dict:
    width, height = model.input_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, height, width, 3)).astype(np.float32)
    x = model.preprocess(images)  # preprocessed once, outside the timing
    keras_model = model._model  # the compiled Keras model: predict_on_batch, nothing else
    for _ in range(2):  # the first call at a new shape traces the graph
        keras_model.predict_on_batch(x)
    times: list[float] = []
    total = 0.0
    cpu_start = time.process_time()  # all of this process's threads: TensorFlow's too
    while len(times) < min_repeat or total < min_seconds:
        start = time.perf_counter()
        keras_model.predict_on_batch(x)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
    cpu_s = time.process_time() - cpu_start
    batch_s = median(times)
    return {
        "batch_size": batch_size,
        "batch_ms": batch_s * 1000,
        "ms_per_image": batch_s * 1000 / batch_size,
        "images_per_s": batch_size / batch_s,
        "cpu_ms_per_image": cpu_s * 1000 / (batch_size * len(times)),
        "cores_busy": cpu_s / total,
        "repeats": len(times),
    }


def measure_model(name: str, sizes: tuple[int, ...], quick: bool) -> dict:
    """One model's row of the table: each batch size, and the best of them."""
    model, weights = build(name, max(sizes))
    seconds, repeat = (0.2, 1) if quick else (MIN_SECONDS, MIN_REPEAT)
    rows = [measure(model, bs, seconds, repeat) for bs in sizes]
    return {"weights": weights, "rows": rows, "best": max(rows, key=lambda r: r["images_per_s"])}


def run(quick: bool = False) -> dict:
    ensure_keras_home()
    models = ("mobilenet",) if quick else MODELS
    sizes = (1, 8) if quick else BATCH_SIZES
    out = {"models": {name: measure_model(name, sizes, quick) for name in models}}
    import keras

    out["backend"] = keras.config.backend()
    if out["backend"] == "tensorflow":
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
        out["devices"] = [d.device_type for d in tf.config.list_physical_devices()]
        out["threads"] = {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        }
    elif out["backend"] == "jax":  # the GPU route on hosts without TensorFlow's CUDA build
        import jax

        out["jax"] = jax.__version__
        out["devices"] = [d.platform for d in jax.devices()]
    return out


def _versions(result: dict) -> str:
    return ", ".join(f"{k} {result[k]}" for k in ("tensorflow", "jax") if k in result) or "?"


def report(result: dict) -> str:
    sizes = sorted({r["batch_size"] for m in result["models"].values() for r in m["rows"]})
    head = "| model (weights) | " + " | ".join(f"b={s}" for s in sizes) + " | best |"
    lines = [head, "|---|" + "---|" * (len(sizes) + 1)]
    for name, m in result["models"].items():
        by_size = {r["batch_size"]: r for r in m["rows"]}
        cells = [
            f"{fmt(by_size[s]['images_per_s'])}/s ({fmt(by_size[s]['ms_per_image'])} ms)"
            if s in by_size
            else ""
            for s in sizes
        ]
        best = m["best"]
        lines.append(
            f"| {name} ({m['weights']}) | "
            + " | ".join(cells)
            + f" | **{fmt(best['images_per_s'])}/s** at b={best['batch_size']} |"
        )
    lines.append("")
    cpu = [
        f"{name} {fmt(m['best']['cpu_ms_per_image'])} ms ({fmt(m['best']['cores_busy'], 2)} cores)"
        for name, m in result["models"].items()
        if "cpu_ms_per_image" in m["best"]
    ]
    if cpu:
        lines.append(
            "CPU time per image at the best batch size (and cores kept busy): "
            + ", ".join(cpu)
            + ". This is the CPU the model alone needs; whatever else runs per image "
            "(HTTP, decoding, SQL, queue) comes out of the same two cores."
        )
        lines.append("")
    lines.append(
        "Images per second (milliseconds per image) of `predict_on_batch` on a preprocessed "
        f"float32 batch; median of at least {MIN_REPEAT} calls and {MIN_SECONDS:.0f} s per cell "
        f"after two warm-up calls. Keras backend {result.get('backend', 'tensorflow')} "
        f"({_versions(result)}) on {', '.join(sorted(set(result.get('devices', ['CPU']))))}; "
        "default threading (intra-op/inter-op 0 = one per core)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
