"""``celery -A bench.worker_app worker``: the real worker, for benchmarks.

Identical to ``worker.celery_app`` except that a built-in model whose ImageNet
weights are not in the Keras cache (InceptionV3 on this offline machine) is
built with random weights instead of failing to download them. Speed and memory
do not depend on the weights' values.
"""

from __future__ import annotations

from bench.common import has_weights
from worker.models import imagenet
from worker.models.registry import BUILTIN_MODELS

WEIGHT_FILES = {"inception_v3": "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"}


def _random_weights(cls):
    class RandomWeights(cls):
        def __init__(self, weights=None, max_batch=imagenet.DEFAULT_MAX_BATCH, **runtime):
            super().__init__(weights=None, max_batch=max_batch, **runtime)

    RandomWeights.__name__ = f"{cls.__name__}RandomWeights"
    return RandomWeights


for _name, _file in WEIGHT_FILES.items():
    if not has_weights(_file):
        BUILTIN_MODELS[_name] = _random_weights(BUILTIN_MODELS[_name])

from worker.celery_app import app  # noqa: E402

__all__ = ["app"]
