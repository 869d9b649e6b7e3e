"""ModelRegistry: configured names, unknown names, once-per-process set-up."""

from __future__ import annotations

import numpy as np
import pytest

from shared.config import Config
from shared.errors import ValidationFailed
from worker.models import BUILTIN_MODELS, ImageModel, MobileNet, ModelRegistry


class FakeModel(ImageModel):
    name = "fake"
    input_size = (8, 8)
    setups = 0

    def build_model(self):
        type(self).setups += 1
        return self

    def load_labels(self) -> list[str]:
        return ["x", "y"]

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        return batch

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:  # stands in for a keras.Model
        return np.full((len(batch), 2), 0.5, dtype=np.float32)


def test_builtin_models() -> None:
    assert set(BUILTIN_MODELS) == {"mobilenet", "mobilenet_v2", "inception_v3"}
    for name, cls in BUILTIN_MODELS.items():
        assert cls.name == name


def test_names_follow_config() -> None:
    config = Config(models=("mobilenet_v2", "mobilenet"))
    assert ModelRegistry(config).names() == ("mobilenet_v2", "mobilenet")
    assert ModelRegistry(Config()).names() == ("mobilenet",)


def test_get_returns_one_instance_per_name() -> None:
    registry = ModelRegistry(Config(batch_max=16))
    model = registry.get("mobilenet")
    assert isinstance(model, MobileNet)
    assert model.max_batch == 16
    assert not model.is_ready  # get() does not load weights
    assert registry.get("mobilenet") is model


@pytest.mark.parametrize("name", ["nope", "", "inception_v3", "MobileNet"])
def test_unknown_model(name: str) -> None:
    registry = ModelRegistry(Config())  # serves only "mobilenet"
    with pytest.raises(ValidationFailed) as info:
        registry.get(name)
    assert info.value.code == "unknown_model"
    assert info.value.status == 422
    assert info.value.details == {"model": name, "available": ["mobilenet"]}


def test_configured_but_unimplemented_is_unknown() -> None:
    registry = ModelRegistry(Config(models=("mobilenet", "my_trained_model")))
    with pytest.raises(ValidationFailed) as info:
        registry.get("my_trained_model")
    assert info.value.code == "unknown_model"


def test_setup_all() -> None:
    FakeModel.setups = 0
    config = Config(models=("fake",), default_model="fake", batch_max=4)
    registry = ModelRegistry(config, classes={"fake": FakeModel})
    registry.setup_all()
    registry.setup_all()
    model = registry.get("fake")
    assert FakeModel.setups == 1
    assert model.is_ready
    assert model.max_batch == 4
    assert model.labels == ["x", "y"]
    assert model.predict_batch(np.zeros((5, 8, 8, 3), np.float32)).shape == (5, 2)


def test_the_api_knows_the_same_builtin_names_as_the_worker() -> None:
    # The API says "not enabled" (not "unknown") for these without importing the worker.
    from shared import config

    assert set(config.BUILTIN_MODELS) == set(BUILTIN_MODELS)
