"""Image classification models for the worker.

Importing this package is cheap: keras/tensorflow load only in ``setup()``.
"""

from worker.models.base import DEFAULT_MAX_BATCH, ImageModel, bucket_sizes, top_k
from worker.models.imagenet import InceptionV3, MobileNet, MobileNetV2, imagenet_labels
from worker.models.registry import BUILTIN_MODELS, ModelRegistry
from worker.models.trained import (
    TrainedModel,
    TrainedModelError,
    read_metadata,
    trained_model_class,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MAX_BATCH",
    "ImageModel",
    "InceptionV3",
    "MobileNet",
    "MobileNetV2",
    "ModelRegistry",
    "TrainedModel",
    "TrainedModelError",
    "bucket_sizes",
    "imagenet_labels",
    "read_metadata",
    "top_k",
    "trained_model_class",
]
