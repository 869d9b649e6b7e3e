"""Trained models in MODEL_DIR: metadata checks, registry look-up, the ImageModel contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.config import Config
from shared.errors import ValidationFailed
from worker.models import ModelRegistry, TrainedModel, TrainedModelError, read_metadata, top_k
from worker.models.trained import trained_model_class

LABELS = ["red", "green", "blue"]


def _tiny_model():
    """Mean colour -> softmax: a real Keras model with the pipeline's preprocessing layers."""
    import keras
    from keras import layers

    inputs = keras.Input((None, None, 3))
    x = layers.Resizing(8, 12)(inputs)  # height 8, width 12
    x = layers.Rescaling(1 / 255)(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    dense = model.layers[-1]
    dense.set_weights([np.eye(3, dtype=np.float32) * 20, np.zeros(3, np.float32)])
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from training.export import export_model

    root = tmp_path_factory.mktemp("models")
    meta = {"class_names": LABELS, "input_size": [12, 8], "arch": "test"}
    export_model(_tiny_model(), root, "colours", meta)
    return root


def test_the_registry_finds_a_trained_model_by_name(model_dir: Path) -> None:
    config = Config(models=("mobilenet", "colours"), model_dir=str(model_dir), batch_max=4)
    registry = ModelRegistry(config)
    model = registry.get("colours")
    assert isinstance(model, TrainedModel)
    assert registry.get("colours") is model
    assert (model.name, model.input_size, model.max_batch) == ("colours", (12, 8), 4)
    assert not model.is_ready
    model.setup()
    assert model.labels == LABELS

    batch = np.zeros((5, 8, 12, 3), np.float32)  # 5 > max_batch: chunked and padded
    batch[:, :, :, 0] = 255  # red
    batch[3, :, :, :] = [0, 0, 255]  # blue
    probs = model.predict_batch(batch)
    assert probs.shape == (5, 3)
    assert [top_k(p, 1, model.labels)[0]["label"] for p in probs] == ["red"] * 3 + ["blue", "red"]
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 8, 12, 3\)"):
        model.predict_batch(np.zeros((1, 12, 8, 3), np.float32))


def test_the_export_replaces_an_older_model(model_dir: Path, tmp_path: Path) -> None:
    from training.export import export_model

    root = tmp_path / "models"
    export_model(_tiny_model(), root, "m", {"class_names": LABELS, "input_size": [12, 8]})
    export_model(_tiny_model(), root, "m", {"class_names": ["a", "b", "c"], "input_size": [12, 8]})
    assert read_metadata(root / "m")["class_names"] == ["a", "b", "c"]
    assert sorted(p.name for p in root.iterdir()) == ["m"]  # no temporary folders left


def test_a_configured_model_without_a_folder_is_unknown(tmp_path: Path) -> None:
    config = Config(models=("mobilenet", "missing"), model_dir=str(tmp_path))
    with pytest.raises(ValidationFailed) as info:
        ModelRegistry(config).get("missing")
    assert info.value.code == "unknown_model"
    assert str(tmp_path / "missing") in info.value.message
    assert info.value.details == {"model": "missing", "available": ["mobilenet", "missing"]}


def test_a_trained_model_must_be_configured(model_dir: Path) -> None:
    registry = ModelRegistry(Config(model_dir=str(model_dir)))  # serves only mobilenet
    with pytest.raises(ValidationFailed) as info:
        registry.get("colours")
    assert info.value.code == "unknown_model"


@pytest.mark.parametrize("name", ["../colours", ".hidden", "a/b"])
def test_names_never_reach_outside_the_model_dir(model_dir: Path, name: str) -> None:
    registry = ModelRegistry(Config(models=("mobilenet", name), model_dir=str(model_dir / "x")))
    with pytest.raises(ValidationFailed) as info:
        registry.get(name)
    assert info.value.code == "unknown_model"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "expected format 1"),
        ({"class_names": ["only"]}, "class_names must be 2"),
        ({"class_names": ["a", "a"]}, "class_names must be 2"),
        ({"input_size": [32]}, "input_size must be"),
        ({"input_size": [32, "32"]}, "input_size must be"),
    ],
)
def test_bad_metadata_is_refused(model_dir: Path, tmp_path: Path, change, message) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.keras").write_bytes((model_dir / "colours" / "model.keras").read_bytes())
    meta = {**read_metadata(model_dir / "colours"), **change}
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(TrainedModelError, match=message):
        trained_model_class(folder)


def test_a_folder_without_the_model_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metadata.json").write_text("{}")
    with pytest.raises(TrainedModelError, match=r"has no model\.keras"):
        read_metadata(tmp_path / "m")


def test_class_names_must_match_the_model_outputs(model_dir: Path, tmp_path: Path) -> None:
    from training.export import export_model

    export_model(
        _tiny_model(), tmp_path, "four", {"class_names": list("abcd"), "input_size": [12, 8]}
    )
    model = trained_model_class(tmp_path / "four")(max_batch=2)
    with pytest.raises(TrainedModelError, match="3 outputs for 4 class names"):
        model.setup()
