"""Augmentation, evaluation numbers, the models' built-in preprocessing, the schedule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training.augment import NONE, Augmentation, augment_batch
from training.evaluate import evaluate


def _batch(n: int = 4, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)


def test_augmentation_keeps_shape_and_can_be_off() -> None:
    x = _batch()
    np.testing.assert_array_equal(np.asarray(augment_batch(x, NONE)), x)
    out = np.asarray(augment_batch(x, Augmentation(rotation=15, zoom=0.2, shift=0.2, vflip=True)))
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, x)


def test_a_flip_alone_mirrors_or_keeps_each_image() -> None:
    x = _batch(16)
    out = np.asarray(augment_batch(x, Augmentation(rotation=0, zoom=0, shift=0, hflip=True)))
    mirrored = [np.allclose(o, i[:, ::-1], atol=1e-3) for o, i in zip(out, x, strict=True)]
    kept = [np.allclose(o, i, atol=1e-3) for o, i in zip(out, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)


def test_evaluate_counts() -> None:
    names = ["a", "b", "c"]
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4],
         [0.6, 0.2, 0.2]]
    )  # fmt: skip
    m = evaluate(y, probs, names)
    assert m["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["correct"] == 4
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    # Class c scores its positives 0.4 and 0.2, its negatives 0.1, 0.1, 0.1, 0.3: 7 of 8 pairs.
    assert m["roc"]["c"]["auc"] == pytest.approx(7 / 8)
    assert m["macro"]["f1"] == pytest.approx(np.mean([c["f1"] for c in m["per_class"].values()]))


def test_a_class_missing_from_the_test_split_has_no_roc() -> None:
    m = evaluate(np.array([0, 1, 0]), np.eye(3)[[0, 1, 2]] * 0.9 + 0.03, ["a", "b", "c"])
    assert m["roc"]["c"]["auc"] is None
    assert m["per_class"]["c"]["support"] == 0
    assert m["macro"]["auc"] == pytest.approx(np.mean([m["roc"]["a"]["auc"], 1.0]))


def test_the_cnn_resizes_and_rescales_inside_the_model() -> None:
    import keras

    from training.models import build_cnn

    model = build_cnn(3, (16, 16), depth=2, width=8, dense_units=0)
    names = [layer.name for layer in model.layers]
    assert names[1:3] == ["resize", "rescale"]
    assert isinstance(model.get_layer("resize"), keras.layers.Resizing)
    assert model.get_layer("rescale").scale == pytest.approx(1 / 255)
    # Any input size: the model resizes to its own.
    assert model.predict_on_batch(np.zeros((2, 40, 24, 3), np.float32)).shape == (2, 3)
    regularized = [layer for layer in model.layers if getattr(layer, "kernel_regularizer", None)]
    assert len(regularized) == 1 + 2 * 2 + 1  # stem, 2 stages x 2 convolutions, classifier
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"Conv2D", "MaxPooling2D", "BatchNormalization", "Dropout", "Dense"} <= kinds


def test_one_cycle_warms_up_then_anneals_to_zero() -> None:
    from training.train import OneCycle

    sched = OneCycle(peak=0.1, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    rates = [sched.rate(s) for s in range(41)]
    assert rates[0] == pytest.approx(0.01) and rates[10] == pytest.approx(0.1)
    assert max(rates) == pytest.approx(0.1) and rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))


class _Model:
    stop_training = False


def test_one_cycle_fits_the_epochs_into_a_deadline() -> None:
    import time

    from training.train import OneCycle

    sched = OneCycle(peak=0.1, epochs=20, steps_per_epoch=10, deadline=time.monotonic() + 70)
    model = _Model()
    sched.set_model(model)
    sched.on_epoch_begin(0)
    sched._epoch_start -= 30  # the first epoch "took" 30 s: 3 more fit in the ~70 s left
    sched.on_epoch_end(0)
    assert sched.planned_epochs == 3 and not model.stop_training
    assert sched.replans == [{"after_epoch": 1, "from": 20, "to": 3}]
    sched.epoch_times = [1.0]  # the machine freed up: the plan grows, up to the limit
    sched.on_epoch_begin(1)
    sched.on_epoch_end(1)
    assert sched.planned_epochs == 20
    sched.deadline = time.monotonic()  # out of time: stop after this epoch
    sched.on_epoch_begin(2)
    sched.on_epoch_end(2)
    assert sched.planned_epochs == 3 and model.stop_training
