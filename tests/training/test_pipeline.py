"""The training pipeline for real: real CIFAR-10 JPEGs in, a served model and its metrics out.

The tests share one run of ``python -m training`` (the ``trained`` fixture); then the
refusals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.config import Config
from shared.images import decode_image, to_array
from tests.training.conftest import (
    CIFAR_CLASSES,
    CORRUPT,
    NAME,
    TEST_PER_CLASS,
    TRAIN_PER_CLASS,
    Trained,
    run_cli,
)
from worker.models import ModelRegistry, TrainedModel, top_k


def test_the_run_ends_with_a_summary(trained: Trained) -> None:
    assert "test:    accuracy" in trained.stdout
    assert f"models/{NAME}" in trained.stdout
    assert str(trained.run_dir / "report.md") in trained.stdout


def test_the_model_is_published_with_its_metadata(trained: Trained) -> None:
    folder = trained.model_dir / NAME
    assert (folder / "model.keras").is_file()
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["format"] == 1 and meta["name"] == NAME and meta["arch"] == "cnn"
    assert meta["class_names"] == list(CIFAR_CLASSES)
    assert meta["input_size"] == [32, 32]
    assert meta["metrics"]["test_count"] == 10 * TEST_PER_CLASS
    assert meta["metrics"]["test_accuracy"] == trained.metrics["metrics"]["accuracy"]
    assert len(meta["data"]["fingerprint"]) == 16
    assert {"git_commit", "git_dirty", "tensorflow", "keras"} <= set(meta["code"])
    assert not [p for p in trained.model_dir.iterdir() if p.name.startswith(".")]


def test_metrics_are_consistent(trained: Trained) -> None:
    m = trained.metrics["metrics"]
    sizes = trained.metrics["data"]["sizes"]
    assert sizes["test"] == m["test_count"] == 10 * TEST_PER_CLASS
    # 24 train images per class, minus the corrupt one, 10% of each class carved off.
    assert sizes["train"] + sizes["validation"] == 10 * TRAIN_PER_CLASS
    cm = np.array(m["confusion_matrix"]["matrix"])
    assert m["confusion_matrix"]["labels"] == list(CIFAR_CLASSES)
    assert cm.shape == (10, 10) and cm.sum() == m["test_count"]
    assert m["correct"] == np.trace(cm)
    assert m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    f1s = []
    for i, name in enumerate(CIFAR_CLASSES):
        c = m["per_class"][name]
        assert c["support"] == cm[i].sum() == TEST_PER_CLASS
        tp, predicted = cm[i, i], cm[:, i].sum()
        assert c["precision"] == pytest.approx(tp / predicted if predicted else 0.0)
        assert c["recall"] == pytest.approx(tp / cm[i].sum())
        p, r = c["precision"], c["recall"]
        assert c["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
        f1s.append(c["f1"])
        auc = m["roc"][name]["auc"]
        assert 0.0 <= auc <= 1.0
        assert m["roc"][name]["fpr"][0] == 0.0 and m["roc"][name]["tpr"][-1] == 1.0
    assert m["macro"]["f1"] == pytest.approx(np.mean(f1s))
    assert m["macro"]["auc"] == pytest.approx(np.mean([m["roc"][n]["auc"] for n in CIFAR_CLASSES]))


def test_plots_and_report(trained: Trained) -> None:
    report = (trained.run_dir / "report.md").read_text()
    for png in ("training_curves.png", "confusion_matrix.png", "roc.png"):
        path = trained.run_dir / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report
    (phase,) = trained.metrics["phases"]
    assert phase["epochs_run"] == 2 and len(phase["history"]["val_loss"]) == 2
    assert (trained.run_dir / "checkpoints" / "train-best.keras").is_file()
    assert f"{100 * trained.metrics['metrics']['accuracy']:.2f}%" in report


def test_a_corrupt_image_is_skipped(trained: Trained) -> None:
    skipped = trained.metrics["data"]["skipped"]
    assert skipped == [str(trained.data_dir / CORRUPT)]
    assert "skipping unreadable image" in trained.stderr and "9999.jpg" in trained.stderr


def _serving_arrays(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    # What the worker does with an image before the model: decode, then to_array.
    return np.stack([to_array(decode_image(p.read_bytes(), max_pixels=10**8), size) for p in paths])


def test_the_registry_serves_the_trained_model(trained: Trained, photos_dir: Path) -> None:
    config = Config(models=("mobilenet", NAME), model_dir=str(trained.model_dir), batch_max=8)
    registry = ModelRegistry(config)
    model = registry.get(NAME)
    assert isinstance(model, TrainedModel) and model.name == NAME
    assert model.input_size == (32, 32)
    model.setup()
    assert model.labels == list(CIFAR_CLASSES)

    # Real photos of any size, resized as the worker resizes them: CIFAR-10 class names.
    photos = sorted(p for p in photos_dir.iterdir() if p.suffix in {".jpg", ".png", ".bmp"})[:5]
    probs = model.predict_batch(_serving_arrays(photos, model.input_size))
    assert probs.shape == (len(photos), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    for row in probs:
        best = top_k(row, 3, model.labels)
        assert best[0]["label"] in CIFAR_CLASSES and len(best) == 3

    # The served model is the evaluated one: same test images, same accuracy.
    test_dir = trained.data_dir / "test"
    paths = [p for c in CIFAR_CLASSES for p in sorted((test_dir / c).glob("*.jpg"))]
    truth = np.array([CIFAR_CLASSES.index(p.parent.name) for p in paths])
    served = model.predict_batch(_serving_arrays(paths, model.input_size))
    accuracy = float((served.argmax(axis=1) == truth).mean())
    assert accuracy == pytest.approx(trained.metrics["metrics"]["accuracy"], abs=1.5 / len(paths))


# --- refusals ----------------------------------------------------------------------


def _flat_dataset(root: Path, cifar_subset: Path, classes: dict[str, int]) -> Path:
    for name, n in classes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for src in sorted((cifar_subset / "train" / name).glob("*.jpg"))[:n]:
            shutil.copy(src, folder / src.name)
    return root


def test_an_empty_class_folder_is_refused(cifar_subset, tmp_path) -> None:
    data = _flat_dataset(tmp_path / "data", cifar_subset, {"cat": 5, "dog": 5})
    (data / "bird").mkdir()
    (data / "bird" / "notes.txt").write_text("not an image")
    rc, out, err = run_cli("--data", str(data), "--out", str(tmp_path / "runs"),
                           "--model-dir", str(tmp_path / "models"))  # fmt: skip
    assert rc == 2 and out == ""
    assert f"class folder {data / 'bird'} has no images" in err
    assert not (tmp_path / "models").exists()


def test_a_single_class_is_refused(cifar_subset, tmp_path) -> None:
    data = _flat_dataset(tmp_path / "data", cifar_subset, {"cat": 5})
    rc, _, err = run_cli("--data", str(data), "--out", str(tmp_path / "runs"),
                         "--model-dir", str(tmp_path / "models"))  # fmt: skip
    assert rc == 2
    assert "has a single class ('cat')" in err and "at least two class folders" in err


def test_a_missing_data_folder_is_refused(tmp_path) -> None:
    rc, _, err = run_cli("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "runs"))
    assert rc == 2 and "does not exist" in err
