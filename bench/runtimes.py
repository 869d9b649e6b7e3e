"""Inference runtimes side by side on MobileNet, and the accuracy gate of reduced precision.

    python -m bench.runtimes                 # speed (best of 3 interleaved rounds) + gate
    python -m bench.runtimes --photos var/datasets/cats_and_dogs_filtered --gate-photos 3000
    python -m bench.runtimes --quick         # smoke: tiny counts, the 11 test photos

Speed: each runtime takes the raw 0..255 RGB batch the worker hands the model, so the
Keras rows include ``preprocess_input`` (as ``ImageModel._forward`` does) and the
OpenVINO rows run it inside the graph. Rounds are interleaved (every runtime at every
batch size, three times over) and the best round is kept, because this shared host's
speed drifts by tens of percent within a minute.

Gate: top-1 agreement and top-5 overlap with the fp32 Keras model on real photos
(cats_and_dogs_filtered, 3,000 photos, extracted from the assets under var/datasets).
The OpenVINO verdicts are recorded in RUNTIME_CACHE_DIR, where ``RUNTIME=auto`` reads them.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.common import ASSETS, PHOTOS, ROOT, ensure_keras_home, fmt, loadavg, machine_info

BATCH_SIZES = (1, 16, 32)
ROUNDS = 3
SECONDS = 2.0  # per runtime, batch size and round
GATE_PHOTOS = 1000
CALIBRATION_PHOTOS = 2000  # the train split; every n-th is taken to make 300
DATASET = ASSETS / "datasets" / "cats_and_dogs_filtered.tar.gz"
DATASET_DIR = ROOT / "var" / "datasets"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def dataset_photos() -> Path:
    """cats_and_dogs_filtered extracted under var/datasets (once); never committed."""
    folder = DATASET_DIR / "cats_and_dogs_filtered"
    if not folder.is_dir():
        DATASET_DIR.mkdir(parents=True, exist_ok=True)
        with tarfile.open(DATASET) as tar:
            tar.extractall(DATASET_DIR, filter="data")
    return folder


def openvino_int8(model, calibration: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    """The fp32 IR quantized to int8 by NNCF post-training quantization (bench only:
    the worker does not offer int8, see docs/benchmarks.md); None without nncf."""
    try:
        import nncf
    except ImportError:
        return None
    import openvino as ov

    from worker.models.runtimes import Choice, OpenVINOModel

    fp32 = model.compile_runtime(Choice("openvino", "fp32"))  # writes the IR if needed
    core = ov.Core()
    samples = [calibration[i : i + 1] for i in range(len(calibration))]
    quantized = nncf.quantize(
        core.read_model(str(fp32.path / "model.xml")),
        nncf.Dataset(samples),
        subset_size=len(samples),
    )
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(quantized, "CPU", config)
    return OpenVINOModel(compiled, fp32.path, from_cache=False).predict_on_batch


def onnxruntime_fp32(model) -> Callable[[np.ndarray], np.ndarray] | None:
    """The same graph (preprocess + network) through tf2onnx and ONNX Runtime's CPU
    provider (bench only: the worker does not offer it, see docs/benchmarks.md)."""
    try:
        import onnxruntime as ort
        import tf2onnx
    except ImportError:
        return None
    import tensorflow as tf

    keras_model = model._model
    spec = tf.TensorSpec([None, 224, 224, 3], tf.float32, name="x")

    @tf.function(input_signature=[spec])
    def forward(x: tf.Tensor) -> tf.Tensor:
        return keras_model(model.preprocess(x), training=False)

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=[spec], opset=17)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def runners(
    cache_dir: Path, calibration: np.ndarray
) -> tuple[object, dict[str, Callable[[np.ndarray], np.ndarray]]]:
    """The MobileNet (fp32 Keras, set up) and each runtime as ``raw batch -> probabilities``."""
    import keras

    from worker.models import MobileNet
    from worker.models.runtimes import Choice, cpu_flags, has_bf16

    model = MobileNet(max_batch=32, runtime="keras", runtime_cache_dir=cache_dir)
    model.setup()
    out: dict[str, Callable] = {"keras fp32 (predict_on_batch)": model.keras_forward}
    if has_bf16(cpu_flags()):
        # TensorFlow's own bf16 (oneDNN): the same network built under mixed_bfloat16.
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            bf16 = keras.applications.MobileNet(alpha=0.75, weights="imagenet")
        finally:
            keras.mixed_precision.set_global_policy("float32")
        pre = keras.applications.mobilenet.preprocess_input
        out["keras bf16 (mixed_bfloat16)"] = lambda b: np.asarray(
            bf16.predict_on_batch(pre(b)), dtype=np.float32
        )
    precisions = ["fp32", "bf16"] if has_bf16(cpu_flags()) else ["fp32"]
    for precision in precisions:
        compiled = model.compile_runtime(Choice("openvino", precision))
        out[f"openvino {precision}"] = compiled.predict_on_batch
    onnx = onnxruntime_fp32(model)
    if onnx is not None:
        out["onnxruntime fp32"] = onnx
    int8 = openvino_int8(model, calibration)
    if int8 is not None:
        out["openvino int8 (NNCF PTQ)"] = int8
    return model, out


def speed(funcs: dict[str, Callable], sizes: tuple[int, ...], rounds: int, seconds: float) -> list:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(sizes), 224, 224, 3)).astype(np.float32)
    best: dict[tuple[str, int], float] = {}
    for fn in funcs.values():  # warm every shape first: OpenVINO compiles per shape
        for size in sizes:
            fn(images[:size].copy())
    for _ in range(rounds):
        for name, fn in funcs.items():
            for size in sizes:
                n, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < seconds or n == 0:
                    fn(images[:size].copy())
                    n += size
                rate = n / elapsed
                best[(name, size)] = max(rate, best.get((name, size), 0.0))
    return [{"runtime": k[0], "batch_size": k[1], "images_per_s": v} for k, v in best.items()]


def accuracy(model, funcs: dict[str, Callable], photos: list[Path], record: bool) -> list:
    """Each runtime against fp32 Keras; with ``record``, the verdicts for what the worker
    can pick go to RUNTIME_CACHE_DIR (a smoke run's few photos never replace a real gate)."""
    from worker.models.runtimes import (
        Choice,
        GateResult,
        agreement,
        load_photos,
        run_batches,
        write_gate,
    )

    images = load_photos(photos, model.input_size)
    reference = run_batches(model.keras_forward, images)
    rows = []
    for name, fn in funcs.items():
        if name.startswith("keras fp32"):
            continue
        result = GateResult(len(images), *agreement(reference, run_batches(fn, images)))
        if record and name in ("openvino fp32", "openvino bf16"):
            choice = Choice("openvino", name.split()[1])
            key = model.runtime_key(choice)
            write_gate(model.runtime_cache_dir, key, result, model=model.name)
        rows.append({"runtime": name, **result.__dict__, "passed": result.passed})
    return rows


def run(quick: bool = False, photos_dir: Path | None = None, gate_photos: int = GATE_PHOTOS):
    ensure_keras_home()  # before keras is imported: it reads KERAS_HOME once
    import openvino
    import tensorflow as tf

    from shared.config import Config
    from worker.models.runtimes import load_photos, photo_paths

    cache_dir = Path(Config.from_env().runtime_cache_dir)
    # Calibration photos for int8 come from the train split, the gate's from validation.
    calibration = photo_paths(PHOTOS if quick else dataset_photos() / "train", CALIBRATION_PHOTOS)
    calibration = load_photos(calibration[:: max(1, len(calibration) // 300)][:300], (224, 224))
    model, funcs = runners(cache_dir, calibration)
    sizes, rounds, seconds = ((1, 16), 1, 0.2) if quick else (BATCH_SIZES, ROUNDS, SECONDS)
    load_before = loadavg()
    rows = speed(funcs, sizes, rounds, seconds)
    gate_folder = PHOTOS if quick else (photos_dir or dataset_photos() / "validation")
    photos = photo_paths(gate_folder, 11 if quick else gate_photos)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load": [load_before, loadavg()],
        "versions": {
            "tensorflow": tf.__version__,
            "openvino": openvino.get_version().split("-")[0],
            "onnxruntime": _version("onnxruntime"),
        },
        "speed": rows,
        "gate": accuracy(model, funcs, photos, record=not quick),
        "gate_folder": str(gate_folder),
        "calibration_photos": len(calibration),
    }


def report(result: dict) -> str:
    sizes = sorted({r["batch_size"] for r in result["speed"]})
    names = list(dict.fromkeys(r["runtime"] for r in result["speed"]))
    rate = {(r["runtime"], r["batch_size"]): r["images_per_s"] for r in result["speed"]}
    m, v = result["machine"], result["versions"]
    n = result["gate"][0]["photos"] if result["gate"] else 0
    where = "/".join(Path(result["gate_folder"]).parts[-2:])
    lines = [
        f"{m['cpu_model']}, {m['nproc']} cores, {result['date']}, load average "
        f"{result['load'][0]} before / {result['load'][1]} after; "
        f"TensorFlow {v['tensorflow']}, OpenVINO {v['openvino']}, "
        f"ONNX Runtime {v.get('onnxruntime')}.",
        "",
        "| runtime | " + " | ".join(f"b={s} images/s" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in names:
        cells = " | ".join(fmt(rate.get((name, s))) for s in sizes)
        lines.append(f"| {name} | {cells} |")
    lines += [
        "",
        f"Accuracy gate against fp32 Keras on {n} photos of `{where}` (pass: top-1 >= 99.5%, "
        "top-5 >= 98%, >= 1,000 photos):",
        "",
        "| runtime | photos | top-1 agreement | top-5 overlap | gate |",
        "|---|---|---|---|---|",
    ]
    for g in result["gate"]:
        lines.append(
            f"| {g['runtime']} | {g['photos']} | {g['top1_agreement']:.2%} | "
            f"{g['top5_overlap']:.2%} | {'passed' if g['passed'] else 'failed'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.runtimes")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--photos", type=Path, default=None, help="gate photos (default: dataset)")
    parser.add_argument("--gate-photos", type=int, default=GATE_PHOTOS)
    parser.add_argument("--json", type=Path, help="also write the raw result here")
    args = parser.parse_args()
    result = run(args.quick, args.photos, args.gate_photos)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print(report(result))


if __name__ == "__main__":
    main()
