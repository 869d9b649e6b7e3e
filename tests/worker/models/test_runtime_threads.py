"""RUNTIME_THREADS reaches the compiled OpenVINO model: config -> registry -> model -> compile.

The compile is real (OpenVINO on this CPU), on a tiny Keras model so the test stays fast.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from shared.config import Config
from worker.models import ImageModel, ModelRegistry
from worker.models.runtimes import compile_properties

pytest.importorskip("openvino")


class TinyModel(ImageModel):
    """A real Keras model small enough to convert in a second."""

    name = "tiny"
    input_size = (8, 8)

    def build_model(self):
        import keras

        inputs = keras.Input((8, 8, 3))
        pooled = keras.layers.GlobalAveragePooling2D()(inputs)
        outputs = keras.layers.Dense(2, activation="softmax")(pooled)
        return keras.Model(inputs, outputs)

    def load_labels(self) -> list[str]:
        return ["a", "b"]

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        return batch / 255.0


def test_runtime_threads_is_read_from_the_environment() -> None:
    assert Config.from_env({}).runtime_threads == 0
    assert Config.from_env({"RUNTIME_THREADS": "1"}).runtime_threads == 1
    with pytest.raises(ValueError, match="RUNTIME_THREADS"):
        Config.from_env({"RUNTIME_THREADS": "-1"})


def test_registry_passes_runtime_threads_to_the_model() -> None:
    model = ModelRegistry(Config(runtime="openvino", runtime_threads=1)).get("mobilenet")
    assert model.runtime_threads == 1


def test_properties_leave_openvino_its_own_choice_by_default() -> None:
    assert "INFERENCE_NUM_THREADS" not in compile_properties("fp32")
    assert compile_properties("fp32", 1)["INFERENCE_NUM_THREADS"] == 1
    assert compile_properties("fp32", 1)["PERFORMANCE_HINT"] == "LATENCY"  # one stream


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to tell 1 from auto")
def test_the_compiled_model_runs_on_the_threads_asked_for(tmp_path) -> None:
    capped = TinyModel(runtime="openvino", runtime_cache_dir=tmp_path, runtime_threads=1)
    capped.setup()
    assert str(capped.choice) == "openvino/fp32"
    assert capped._compiled.threads == 1
    # The same model without the setting: OpenVINO's own choice, one thread per core.
    auto = TinyModel(runtime="openvino", runtime_cache_dir=tmp_path)
    auto.setup()
    assert auto._compiled.threads == len(os.sched_getaffinity(0))
    probs = capped.predict_batch(np.full((2, 8, 8, 3), 128.0, dtype=np.float32))
    assert probs.shape == (2, 2)
