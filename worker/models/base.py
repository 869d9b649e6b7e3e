"""The interface every classification model in the worker implements.

Modelled on replicate/cog's ``BasePredictor``: a model object is cheap to
construct, ``setup()`` loads its weights once per process (in the worker, after
the pool has forked, never at import time), and ``predict_batch()`` then runs
many times. Importing this module imports neither keras nor tensorflow: the API
process imports ``worker.models`` for names and errors and must stay light.

Batches are padded up to a fixed set of bucket sizes (powers of two up to
``max_batch``) so the backend's compiled predict function sees only a handful of
input shapes and is reused instead of retraced (TensorFlow) or recompiled (JAX)
for every batch size the queue happens to deliver.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import keras

DEFAULT_MAX_BATCH = 32


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

    def __init__(self, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.max_batch = max_batch
        self.buckets = bucket_sizes(max_batch)
        self._model: Any = None
        self._labels: list[str] | None = None

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
        labels = list(self.load_labels())
        model = self.build_model()
        self._labels = labels
        self._model = model
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
            bucket = next(b for b in self.buckets if b >= size)
            # A fresh buffer: preprocess() works in place and the caller's array
            # must not change; zero rows pad the chunk up to the bucket size.
            buf = np.zeros((bucket, height, width, 3), dtype=np.float32)
            buf[:size] = chunk
            out[start : start + size] = self._forward(buf)[:size]
        return out

    def _forward(self, batch: np.ndarray) -> np.ndarray:
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
        rounded to 6 decimals.
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
