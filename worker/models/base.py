"""The interface every classification model in the worker implements.

Modelled on replicate/cog's ``BasePredictor``: a model object is cheap to
construct, ``setup()`` loads its weights once per process (in the worker, after
the pool has forked, never at import time), and ``predict_batch()`` then runs
many times. Importing this module imports neither keras nor tensorflow: the worker's
main process imports ``worker.models`` and must stay TensorFlow-free to fork safely
(the API never imports the worker; it names the built-in models from
``shared.config``).

On Keras, batches are padded up to a fixed set of bucket sizes (powers of two up
to ``max_batch``) so the backend's compiled predict function sees only a handful of
input shapes and is reused instead of retraced (TensorFlow) or recompiled (JAX)
for every batch size the queue happens to deliver. A compiled runtime (OpenVINO, whose
model has a dynamic batch dimension) runs each batch at its own size: see ``_run_size``.

What runs the forward pass is the model's ``runtime`` (``RUNTIME``): Keras'
``predict_on_batch``, or the same Keras model compiled by OpenVINO in ``setup()``
(``worker.models.runtimes``), which takes the raw batch with preprocessing inside.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from worker.models import runtimes
from worker.models.runtimes import Choice, OpenVINOModel

if TYPE_CHECKING:
    import keras

DEFAULT_MAX_BATCH = 32
DEFAULT_RUNTIME_CACHE_DIR = "var/runtime-cache"

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Batch sizes the model is run at: powers of two below ``max_batch``, then ``max_batch``.

    >>> bucket_sizes(32)
    (1, 2, 4, 8, 16, 32)
    >>> bucket_sizes(24)
    (1, 2, 4, 8, 16, 24)
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return tuple(sizes)


class ImageModel(abc.ABC):
    """An image classifier: float32 RGB batches in, class probabilities out.

    Subclasses set the class attributes and implement ``build_model``,
    ``load_labels`` and ``preprocess``; everything else (set-up, warm-up,
    bucketing, chunking) is shared.

    Lifecycle::

        model = MobileNet(max_batch=32)   # cheap: no keras import, no weights
        model.setup()                     # once per process: loads weights, warms up
        probs = model.predict_batch(batch)

    Class attributes:
        name: The model's public name, as clients pass it and ``MODELS`` lists it
            (e.g. ``"mobilenet"``).
        input_size: ``(width, height)`` in pixels that ``predict_batch`` expects;
            callers resize images to this before batching. Note the order: an
            input batch has shape ``(N, height, width, 3)``.
    """

    name: ClassVar[str]
    input_size: ClassVar[tuple[int, int]]

    def __init__(
        self,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        runtime: str = "keras",
        runtime_cache_dir: str | Path = DEFAULT_RUNTIME_CACHE_DIR,
        runtime_threads: int = 0,
    ) -> None:
        """
        Args:
            max_batch: Largest batch run at once; larger batches are chunked.
            runtime: ``keras`` (default when built directly), ``openvino`` or ``auto``
                (the ``RUNTIME`` setting; see ``worker.models.runtimes``).
            runtime_cache_dir: Where compiled forms of the model are cached.
            runtime_threads: OpenVINO's inference threads (``RUNTIME_THREADS``; 0: its own).
        """
        self.max_batch = max_batch
        self.buckets = bucket_sizes(max_batch)
        self.runtime = runtime
        self.runtime_cache_dir = Path(runtime_cache_dir)
        self.runtime_threads = runtime_threads
        self._model: Any = None
        self._labels: list[str] | None = None
        self._compiled: OpenVINOModel | None = None
        self._digest: str | None = None
        self.choice: Choice | None = None  # what runs the model, once set up

    def __repr__(self) -> str:
        state = "ready" if self.is_ready else "not set up"
        return f"<{type(self).__name__} {self.name!r} max_batch={self.max_batch} {state}>"

    # --- hooks for subclasses ------------------------------------------------

    @abc.abstractmethod
    def build_model(self) -> keras.Model:
        """Build the network and load its weights; called by ``setup()`` (may import keras)."""

    @abc.abstractmethod
    def load_labels(self) -> list[str]:
        """Return the class names, index ``i`` naming output column ``i``."""

    @abc.abstractmethod
    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """Map a float32 RGB batch in 0..255 to the network's input.

        ``batch`` is a private buffer owned by ``predict_batch``: it may be
        modified in place (Keras' ``preprocess_input`` functions do that).
        """

    # --- lifecycle -------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._model is not None

    def setup(self) -> None:
        """Load the weights and labels and warm up the smallest bucket.

        Call once per process, after fork: the loaded backend state must not be
        shared between processes. Calling it again is a no-op.
        """
        if self.is_ready:
            return
        if self.runtime == "null":
            self._setup_null()
            return
        labels = list(self.load_labels())
        model = self.build_model()
        self._labels = labels
        self._model = model
        self._use_runtime()
        # Trace/compile the predict function now rather than on the first job.
        width, height = self.input_size
        self._forward(np.zeros((self.buckets[0], height, width, 3), dtype=np.float32))

    @property
    def labels(self) -> list[str]:
        """Class names, index = class id. Available after ``setup()``; do not mutate."""
        if self._labels is None:
            raise RuntimeError(f"{self!r}: call setup() before using labels")
        return self._labels

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    # --- inference -------------------------------------------------------------

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Classify a batch of images.

        Args:
            images: ``(N, height, width, 3)`` RGB values in 0..255 (float32; other
                numeric dtypes are converted), at ``input_size``. Not modified.

        Returns:
            ``(N, num_classes)`` float32 probabilities, row ``i`` for image ``i``.
            Batches larger than ``max_batch`` are run in chunks of ``max_batch``;
            each chunk is zero-padded to the next bucket size and the padding
            rows are dropped from the result.
        """
        if not self.is_ready:
            raise RuntimeError(f"{self!r}: call setup() before predict_batch()")
        width, height = self.input_size
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (height, width, 3):
            raise ValueError(
                f"{self.name}: expected a batch of shape (N, {height}, {width}, 3), "
                f"got {images.shape}"
            )
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        out = np.empty((n, self.num_classes), dtype=np.float32)
        for start in range(0, n, self.max_batch):
            chunk = images[start : start + self.max_batch]
            size = len(chunk)
            # A fresh buffer: preprocess() works in place and the caller's array
            # must not change; on Keras, zero rows pad the chunk up to its bucket.
            buf = np.zeros((self._run_size(size), height, width, 3), dtype=np.float32)
            buf[:size] = chunk
            out[start : start + size] = self._forward(buf)[:size]
        return out

    def _run_size(self, size: int) -> int:
        """The batch size that a chunk of ``size`` images runs at.

        Keras: the next bucket (a new input shape would be traced again, seconds).
        A compiled runtime: ``size`` itself. OpenVINO's CPU plugin runs the IR's
        dynamic batch dimension at any size for about the same CPU per image (MobileNet
        fp32, 2 cores: 7.4-9.0 ms at every size from 1 to 32; a size's first run costs
        a few ms more, once), so padding was waste: a batch of 9 ran as 16 for 1.9x
        the CPU per image, and waiting clients' batches are mostly of such sizes
        (issue #22). The price is memory, bounded by ``max_batch``: the runtime keeps
        its state for each size it has run (MobileNet: about 110 MB more once all 32
        sizes have run, docs/benchmarks.md).
        """
        if self._compiled is not None:
            return size
        return next(b for b in self.buckets if b >= size)

    # --- runtimes (worker.models.runtimes) ---------------------------------------

    def _use_runtime(self) -> None:
        """Pick what runs the model (``self.runtime``) and compile it; Keras needs nothing."""
        choice = runtimes.KERAS if self.runtime == "keras" else self._choose_runtime()
        if choice.runtime == "openvino":
            try:
                self._compiled = self._compile_checked(choice)
            except Exception:
                if self.runtime != "auto":
                    raise
                # auto must never stop a worker that Keras alone can serve.
                log.exception("%s: OpenVINO failed; using Keras", self.name)
                choice = runtimes.KERAS
        self.choice = choice
        cached = " (from cache)" if self._compiled and self._compiled.from_cache else ""
        log.info("%s: runtime %s%s (RUNTIME=%s)", self.name, choice, cached, self.runtime)

    def _setup_null(self) -> None:
        """RUNTIME=null: labels only, no weights; fixed probabilities (benchmarks only)."""
        self._labels = list(self.load_labels())
        self._compiled = self._model = runtimes.NullModel(len(self._labels))  # type: ignore[assignment]
        self.choice = runtimes.NULL
        log.warning(
            "%s: RUNTIME=null: no model runs, every image gets the same fixed answer "
            "(for benchmarks only)",
            self.name,
        )

    def _compile_checked(self, choice: Choice) -> OpenVINOModel:
        compiled = self.compile_runtime(choice)
        # bf16 was checked by the gate on real photos; fp32 must match Keras here.
        if choice.precision == "fp32" and not self._agrees_with_keras(compiled):
            raise RuntimeError(f"{self.name}: OpenVINO fp32 output differs from Keras'")
        return compiled

    def _choose_runtime(self) -> Choice:
        import keras

        if self.runtime == "auto" and not isinstance(self._model, keras.Model):
            return runtimes.KERAS  # only a Keras model can be converted
        options = runtimes.candidates(
            self.runtime,
            gpu=runtimes.keras_has_gpu(),
            backend=keras.config.backend(),
            flags=runtimes.cpu_flags(),
            ov_version=runtimes.openvino_version(),
        )
        return runtimes.select(
            options, lambda c: runtimes.read_gate(self.runtime_cache_dir, self.runtime_key(c))
        )

    def runtime_key(self, choice: Choice) -> str:
        """The cache key of this model's compiled form under ``choice``."""
        if self._digest is None:  # hashing ~10 MB of weights: once
            self._digest = runtimes.weights_digest(self._model)
        width, height = self.input_size
        return runtimes.cache_key(
            weights=self._digest,
            model_class=f"{type(self).__module__}.{type(self).__qualname__}",
            input_shape=(height, width, 3),
            runtime=choice.runtime,
            runtime_version=runtimes.openvino_version() or "none",
            precision=choice.precision,
            flags=runtimes.cpu_flags(),
        )

    def compile_runtime(self, choice: Choice) -> OpenVINOModel:
        """This model compiled for ``choice`` (OpenVINO), read from the cache when there."""
        key = self.runtime_key(choice)
        return runtimes.compile_openvino(
            self,
            self._model,
            choice.precision,
            self.runtime_cache_dir,
            key,
            threads=self.runtime_threads,
        )

    def _agrees_with_keras(self, compiled: OpenVINOModel) -> bool:
        """fp32 self-check: same probabilities as Keras on a fixed pseudo-random batch."""
        width, height = self.input_size
        probe = np.random.default_rng(0).uniform(0, 255, (2, height, width, 3))
        probe = probe.astype(np.float32)
        expected = self.keras_forward(probe.copy())
        diff = float(np.max(np.abs(compiled.predict_on_batch(probe) - expected)))
        return diff <= runtimes.FP32_MAX_ABS_DIFF

    def keras_forward(self, batch: np.ndarray) -> np.ndarray:
        """The fp32 Keras model on a raw batch (may modify ``batch``): the gate's reference."""
        return np.asarray(self._model.predict_on_batch(self.preprocess(batch)), dtype=np.float32)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        if self._compiled is not None:  # preprocessing is inside the compiled graph
            return self._compiled.predict_on_batch(batch)
        # predict_on_batch runs Keras' cached predict function (a tf.function
        # under TensorFlow, jax.jit under JAX). Measured on the 2-core CPU box,
        # MobileNet 0.75, tensorflow-cpu 2.21, ms per image at batch 1 / 8 / 32:
        #   predict_on_batch                    24.5 / 13.4 /   8.4
        #   eager model(x, training=False)     131   / 31   /  15.9
        #   compile(jit_compile=True) + p.o.b.  90   / 115  / 139   (XLA on CPU)
        # so plain predict_on_batch it is (Keras itself turns XLA off on CPU-only TF).
        probs = self._model.predict_on_batch(self.preprocess(batch))
        return np.asarray(probs, dtype=np.float32)


def top_k(probs: np.ndarray, k: int, labels: list[str]) -> list[dict]:
    """The ``k`` most probable classes of one image, best first.

    Args:
        probs: ``(num_classes,)`` probabilities for a single image (one row of
            ``predict_batch``'s result).
        k: How many to return, at least 1; capped at ``num_classes``.
        labels: Class names, index = class id (``ImageModel.labels``).

    Returns:
        ``[{"label": str, "class_id": int, "score": float}, ...]`` sorted by
        descending score (ties: lower class id first); scores are Python floats
        rounded to 6 decimals (which lets ``jobs.result`` store them as integer
        millionths: shared/results.py).
    """
    probs = np.asarray(probs)
    if probs.ndim != 1:
        raise ValueError(f"top_k expects one image's probabilities (1-D), got {probs.shape}")
    if len(labels) != probs.shape[0]:
        raise ValueError(f"{len(labels)} labels for {probs.shape[0]} classes")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {"label": labels[i], "class_id": int(i), "score": round(float(probs[i]), 6)} for i in order
    ]
