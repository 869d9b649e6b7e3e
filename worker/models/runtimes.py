"""Inference runtimes: run a Keras model through OpenVINO instead of Keras, when that is faster.

The model stays a Keras model (built-in ImageNet or trained). With ``RUNTIME=openvino``
(or ``auto`` on a CPU) the worker's ``setup()`` traces ``model(preprocess(x))`` as one
TensorFlow graph, converts it to OpenVINO IR and compiles it for the CPU. The
preprocessing is inside the graph, so the compiled model takes the same raw 0..255 RGB
batch that ``ImageModel.predict_batch`` takes.

The IR is cached on disk under ``RUNTIME_CACHE_DIR/<key>/`` where ``key`` hashes the
weights' values, the model class, the input shape, the runtime and its version and the
precision; a restart reads it back instead of tracing and converting again (seconds
saved per process). OpenVINO's own compiled-kernel cache lives beside it.

Precision. ``fp32`` is the Keras model's arithmetic: it is used after a start-up
self-check (compiled and Keras outputs agree on a test input). ``bf16`` (AMX/AVX-512
BF16 CPUs only) changes results slightly, so it is used only where the accuracy gate
has passed for this exact (model weights, runtime version, CPU features): top-1 agrees
with the fp32 Keras model on at least 99.5% of at least 1,000 real photos and the top-5
sets overlap at least 98%. The gate is run by ``python -m worker.models.gate``
(or ``python -m bench.runtimes``) and its verdict is recorded in the cache; a worker
never runs it at start (it has no photos), and without a passing record it uses fp32.

On a GPU, or with a non-TensorFlow Keras backend, ``auto`` keeps Keras.

``RUNTIME=null`` is for benchmarks only: no weights are loaded and every image gets
the same fixed probabilities at once (``NullModel``), a stand-in for a GPU so that a
benchmark measures the service's own plumbing (``python -m bench.null_model``). The
configuration refuses it unless ALLOW_NULL_RUNTIME=1 and the database is local, and
the worker logs a warning at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.config import RUNTIMES

if TYPE_CHECKING:
    import keras

    from worker.models.base import ImageModel

# The gate's thresholds (issue #17): a reduced precision must keep the fp32 Keras answers.
GATE_TOP1 = 0.995
GATE_TOP5 = 0.98
GATE_MIN_PHOTOS = 1000
# fp32 self-check at start: the graph is the same arithmetic, so only rounding differs.
FP32_MAX_ABS_DIFF = 1e-3
# CPU features that make bf16 fast (and that change what bf16 computes: part of the key).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
KEY_FLAGS = (*BF16_FLAGS, "amx_int8", "avx512_vnni", "avx512f", "avx2")


@dataclass(frozen=True)
class Choice:
    """What runs a model: ``runtime`` is ``keras`` or ``openvino``; ``precision`` fp32|bf16."""

    runtime: str
    precision: str = "fp32"

    def __str__(self) -> str:
        return f"{self.runtime}/{self.precision}"


KERAS = Choice("keras", "fp32")
NULL = Choice("null", "none")


@dataclass(frozen=True)
class GateResult:
    """How far a reduced-precision runtime agrees with the fp32 Keras model on real photos."""

    photos: int
    top1_agreement: float
    top5_overlap: float

    @property
    def passed(self) -> bool:
        return (
            self.photos >= GATE_MIN_PHOTOS
            and self.top1_agreement >= GATE_TOP1
            and self.top5_overlap >= GATE_TOP5
        )


# --- hardware -----------------------------------------------------------------------


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags (``/proc/cpuinfo``'s first ``flags`` line); empty if unknown."""
    return frozenset((_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: str | None = None) -> str:
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or "unknown"


def _cpuinfo_field(name: str, cpuinfo: str | None) -> str | None:
    """The value of the first ``name`` line of ``/proc/cpuinfo`` (or of ``cpuinfo``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None


def has_bf16(flags: Iterable[str]) -> bool:
    return bool(set(flags) & set(BF16_FLAGS))


def keras_has_gpu() -> bool:
    """Whether Keras would run on a GPU (TensorFlow's or JAX's device list)."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    return False


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


# --- selection (pure) ---------------------------------------------------------------


def candidates(
    runtime: str, *, gpu: bool, backend: str, flags: Iterable[str], ov_version: str | None
) -> list[Choice]:
    """What to try for ``RUNTIME=runtime``, fastest first; the last entry always works.

    ``openvino`` is asked for explicitly or ``auto`` picks it on a CPU with the TensorFlow
    backend (the conversion traces a TensorFlow graph). bf16 comes first where the CPU
    computes it natively; it still needs a passing gate record (``select``).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"RUNTIME must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "keras":
        return [KERAS]
    if runtime == "null":
        return [NULL]
    usable = ov_version is not None and backend == "tensorflow"
    if runtime == "openvino" and not usable:
        raise RuntimeError("RUNTIME=openvino needs openvino installed and KERAS_BACKEND=tensorflow")
    if not usable or (runtime == "auto" and gpu):
        return [KERAS]
    found = [Choice("openvino", "bf16")] if has_bf16(flags) else []
    return [*found, Choice("openvino", "fp32"), KERAS]


def select(options: Sequence[Choice], gate: Callable[[Choice], GateResult | None]) -> Choice:
    """The first option that needs no gate (fp32) or whose recorded gate passed."""
    for choice in options:
        if choice.precision == "fp32":
            return choice
        result = gate(choice)
        if result is not None and result.passed:
            return choice
    return KERAS


# --- cache keys ---------------------------------------------------------------------


def weights_digest(model: keras.Model) -> str:
    """sha256 of the model's weight values (names, shapes, bytes) and architecture name.

    Values, not a file: built-in models load from Keras' cache and trained ones from a
    ``.keras`` archive, and either may be re-saved without changing a number.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for w in model.weights:
        value = np.ascontiguousarray(np.asarray(w.numpy()))
        h.update(f"{w.path}:{value.dtype}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def cache_key(
    *,
    weights: str,
    model_class: str,
    input_shape: Sequence[int],
    runtime: str,
    runtime_version: str,
    precision: str,
    flags: Iterable[str] = (),
) -> str:
    """The cache folder name for one compiled model: a hash of everything it depends on.

    ``flags`` are the CPU features that change what a precision computes (bf16 on AMX
    vs emulated), so a cache copied to another machine is not trusted blindly.
    """
    parts = {
        "weights": weights,
        "model_class": model_class,
        "input_shape": [int(v) for v in input_shape],
        "runtime": runtime,
        "runtime_version": runtime_version,
        "precision": precision,
        "flags": sorted(set(flags) & set(KEY_FLAGS)),
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return f"{runtime}-{precision}-{hashlib.sha256(blob).hexdigest()[:24]}"


# --- OpenVINO ----------------------------------------------------------------------


class OpenVINOModel:
    """A compiled OpenVINO model: ``predict_on_batch(raw_rgb_batch) -> probabilities``.

    Attributes:
        from_cache: True when the IR was read from the cache, False when converted now.
        path: The cache folder.
    """

    def __init__(self, compiled: Any, path: Path, from_cache: bool) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        # One infer request, shared: the worker already serialises forward passes, but
        # other callers (bench, tests) must not race on it either.
        self._lock = threading.Lock()
        self.path = path
        self.from_cache = from_cache
        # What OpenVINO settled on (RUNTIME_THREADS, or its own choice), for logs and benches.
        self.threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            result = self._request.infer({0: batch}, share_inputs=True)
            return np.array(result[0], dtype=np.float32)  # a copy: the buffer is reused


class NullModel:
    """``RUNTIME=null``: the same probabilities for every image, at once (benchmarks only)."""

    def __init__(self, num_classes: int) -> None:
        # A fixed, strictly decreasing distribution: top-k is stable and sums to 1.
        weights = np.arange(num_classes, 0, -1, dtype=np.float32)
        self._row = weights / weights.sum()
        self.from_cache = False

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        return np.tile(self._row, (len(batch), 1))


def _convert(model: ImageModel, keras_model: keras.Model, target: Path) -> None:
    """Trace preprocess + network as one TF graph and write it as OpenVINO IR to ``target``."""
    import openvino as ov
    import tensorflow as tf

    width, height = model.input_size
    spec = tf.TensorSpec([None, height, width, 3], tf.float32)

    @tf.function(input_signature=[spec])
    def forward(x: tf.Tensor) -> tf.Tensor:
        return keras_model(model.preprocess(x), training=False)

    ir = ov.convert_model(forward.get_concrete_function(), input=[(-1, height, width, 3)])
    ov.save_model(ir, str(target / "model.xml"), compress_to_fp16=False)


def _write_cache(model: ImageModel, keras_model: keras.Model, folder: Path, meta: dict) -> bool:
    """Convert into a temporary folder, then rename it into place: processes starting at
    once (prefork) each convert, the first rename wins, none reads a half-written file."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _convert(model, keras_model, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.rename(tmp, folder)
        return True
    except OSError:
        if (folder / "model.xml").is_file():
            return False  # another process won the race
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compile_properties(precision: str, threads: int = 0) -> dict[str, Any]:
    """OpenVINO's CPU properties for a worker's model (``RUNTIME_THREADS`` is ``threads``).

    The LATENCY hint gives one stream: the worker runs one forward pass at a time
    (``worker/pipeline.py``'s forward lock), so a second stream would only hold threads
    that no request uses. ``threads`` caps that stream's threads (0: OpenVINO's choice,
    one per core), leaving the other cores to the loaders.
    """
    hint = "bf16" if precision == "bf16" else "f32"  # OpenVINO defaults to bf16 on AMX
    props: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        props["INFERENCE_NUM_THREADS"] = threads
    return props


def compile_openvino(
    model: ImageModel,
    keras_model: keras.Model,
    precision: str,
    cache_dir: Path,
    key: str,
    *,
    threads: int = 0,
) -> OpenVINOModel:
    """The OpenVINO form of ``keras_model`` at ``precision``, from the cache or converted now;
    ``threads``: OpenVINO's inference threads (0: its own choice)."""
    import openvino as ov

    folder = cache_dir / key
    from_cache = (folder / "model.xml").is_file()
    if not from_cache:
        meta = {"model": model.name, "precision": precision, "openvino": openvino_version()}
        _write_cache(model, keras_model, folder, meta)
    core = ov.Core()
    # Kernels compiled for this CPU are cached too (OpenVINO's own format).
    core.set_property({"CACHE_DIR": str(cache_dir / "openvino-kernels")})
    compiled = core.compile_model(
        core.read_model(str(folder / "model.xml")), "CPU", compile_properties(precision, threads)
    )
    return OpenVINOModel(compiled, folder, from_cache)


# --- the gate ----------------------------------------------------------------------


def agreement(reference: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean top-5 overlap) of ``probs`` with ``reference``, both (N, C)."""
    if reference.shape != probs.shape or reference.ndim != 2 or len(reference) == 0:
        raise ValueError(f"need equal non-empty (N, C) arrays: {reference.shape}, {probs.shape}")
    top1 = float(np.mean(reference.argmax(1) == probs.argmax(1)))
    k = min(5, reference.shape[1])
    ref5 = np.argsort(-reference, axis=1)[:, :k]
    got5 = np.argsort(-probs, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(ref5, got5, strict=True)]
    return top1, float(np.mean(overlap))


def gate_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "gates" / f"{key}.json"


def read_gate(cache_dir: Path, key: str) -> GateResult | None:
    try:
        data = json.loads(gate_path(cache_dir, key).read_text())
        return GateResult(data["photos"], data["top1_agreement"], data["top5_overlap"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_gate(cache_dir: Path, key: str, result: GateResult, **extra: Any) -> None:
    path = gate_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**asdict(result), "passed": result.passed, "cpu": cpu_model(), **extra}
    path.write_text(json.dumps(record, indent=2, sort_keys=True))


def load_photos(paths: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    """Photos as a float32 (N, height, width, 3) batch, resized as the worker does (bilinear)."""
    from PIL import Image

    out = np.empty((len(paths), size[1], size[0], 3), dtype=np.float32)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            out[i] = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    return out


def photo_paths(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` photos under ``folder`` in a stable order."""
    suffixes = {".jpg", ".jpeg", ".png", ".bmp"}
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)[:limit]


def run_batches(
    predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int = 32
) -> np.ndarray:
    """``predict`` over ``images`` in batches of ``batch``, each a private copy."""
    parts = [predict(images[i : i + batch].copy()) for i in range(0, len(images), batch)]
    return np.concatenate(parts)


def gate(model: ImageModel, precision: str, images: np.ndarray) -> GateResult:
    """Run ``model``'s OpenVINO form at ``precision`` and its Keras form on ``images`` and
    compare. Records the verdict in the cache (only a run on >= 1,000 photos can pass)."""
    choice = Choice("openvino", precision)
    reference = run_batches(model.keras_forward, images)
    got = run_batches(model.compile_runtime(choice).predict_on_batch, images)
    result = GateResult(len(images), *agreement(reference, got))
    key = model.runtime_key(choice)
    write_gate(model.runtime_cache_dir, key, result, model=model.name, precision=precision)
    return result
