"""Keras Applications classifiers trained on ImageNet (1000 classes).

Weights and the class index are fetched the standard Keras way
(``keras.utils.get_file`` into ``$KERAS_HOME/models``): they download where a
network exists and are read from that cache otherwise. Nothing here imports
keras until ``setup()``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from worker.models.base import DEFAULT_MAX_BATCH, ImageModel

if TYPE_CHECKING:
    import keras

# Keras' own class index, with the same URL and md5 that
# keras.src.applications.imagenet_utils.decode_predictions uses (that module's
# CLASS_INDEX_PATH is not part of the public keras API, hence the copy; a test
# checks that the two agree).
CLASS_INDEX_PATH = (
    "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"
)
CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names (e.g. ``"malamute"``), index = class id.

    Read once per process from Keras' ``imagenet_class_index.json``.
    """
    import keras

    path = keras.utils.get_file(
        "imagenet_class_index.json",
        CLASS_INDEX_PATH,
        cache_subdir="models",
        file_hash=CLASS_INDEX_MD5,
    )
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    return tuple(index[str(i)][1] for i in range(len(index)))


class _KerasImageNetModel(ImageModel):
    """A ``keras.applications`` model with its own ``preprocess_input``.

    Subclasses name the ``keras.applications`` submodule (``_module``) whose
    ``preprocess_input`` matches the architecture and implement ``build_model``.
    """

    _module: ClassVar[str]

    def __init__(
        self,
        weights: str | None = "imagenet",
        max_batch: int = DEFAULT_MAX_BATCH,
        **runtime: Any,
    ) -> None:
        """
        Args:
            weights: ``"imagenet"`` (download or read from the Keras cache),
                ``None`` (random initialisation: for shape and speed tests), or
                the path to a weights file.
            max_batch: Largest batch run at once; larger batches are chunked.
            runtime: ``runtime``, ``runtime_cache_dir`` and ``runtime_threads``, as
                ``ImageModel`` takes them.
        """
        super().__init__(max_batch=max_batch, **runtime)
        self.weights = weights
        self._preprocess_input: Callable[[np.ndarray], np.ndarray] | None = None

    def load_labels(self) -> list[str]:
        return list(imagenet_labels())

    def setup(self) -> None:
        if self.is_ready:
            return
        import keras

        module = getattr(keras.applications, self._module)
        self._preprocess_input = module.preprocess_input
        super().setup()

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        assert self._preprocess_input is not None, "setup() runs before the first batch"
        return self._preprocess_input(batch)

    def _input_shape(self) -> tuple[int, int, int]:
        width, height = self.input_size
        return (height, width, 3)


class MobileNet(_KerasImageNetModel):
    """MobileNet v1, width multiplier (alpha) 0.75, 224x224: the service's default model.

    Keras' original float ImageNet weights (``mobilenet_7_5_224_tf.h5``).
    About 10 ms per image at batch 8-32 on a 2-core CPU.
    """

    name = "mobilenet"
    input_size = (224, 224)
    _module = "mobilenet"

    def build_model(self) -> keras.Model:
        import keras

        return keras.applications.MobileNet(
            input_shape=self._input_shape(), alpha=0.75, weights=self.weights
        )


class MobileNetV2(_KerasImageNetModel):
    """MobileNetV2, alpha 1.0, 224x224.

    Loads Keras' cache file ``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5``.
    Where a network exists that is Keras' official float file. The copy used in
    this project's development and CI environment is *derived*: weights
    dequantized from Google's int8 TFLite MobileNetV2 1.0/224, not the original
    float weights; its accuracy is close to, not identical with, the original.
    """

    name = "mobilenet_v2"
    input_size = (224, 224)
    _module = "mobilenet_v2"

    def build_model(self) -> keras.Model:
        import keras

        return keras.applications.MobileNetV2(
            input_shape=self._input_shape(), alpha=1.0, weights=self.weights
        )


class InceptionV3(_KerasImageNetModel):
    """InceptionV3, 299x299 (the model of the original seed application).

    Its ImageNet weights (~92 MB) download on first ``setup()`` where a network
    exists; they are not in the offline development cache, where it is used
    with ``weights=None`` for shape and speed tests only. Roughly 90 ms per
    image on a 2-core CPU, with no gain from batching.
    """

    name = "inception_v3"
    input_size = (299, 299)
    _module = "inception_v3"

    def build_model(self) -> keras.Model:
        import keras

        return keras.applications.InceptionV3(input_shape=self._input_shape(), weights=self.weights)
