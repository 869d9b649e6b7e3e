"""Data folders: layouts, refusals, corrupt images, splits, class balance (no training)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    DatasetError,
    class_weights,
    discover,
    load_dataset,
    oversample,
    stratified_split,
)


def _copy(cifar_subset: Path, dest: Path, cls: str, n: int, split: str = "train") -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted((cifar_subset / split / cls).glob("*.jpg"))[:n]:
        shutil.copy(src, dest / src.name)


def test_a_flat_folder_is_split_80_10_10_stratified_and_seeded(cifar_subset, tmp_path) -> None:
    for cls in ("cat", "dog", "ship"):
        _copy(cifar_subset, tmp_path / cls, cls, 20)
    a = load_dataset(tmp_path, (32, 32), seed=3)
    b = load_dataset(tmp_path, (32, 32), seed=3)
    c = load_dataset(tmp_path, (32, 32), seed=4)
    assert a.class_names == ["cat", "dog", "ship"]
    assert a.layout.startswith("one folder per class")
    assert a.train.counts(3) == [16, 16, 16]
    assert a.validation.counts(3) == [2, 2, 2] and a.test.counts(3) == [2, 2, 2]
    assert a.train.x.shape == (48, 32, 32, 3) and a.train.x.dtype == np.uint8
    np.testing.assert_array_equal(a.test.x, b.test.x)  # same seed, same split
    assert not np.array_equal(a.test.x, c.test.x)
    # No image is in two splits.
    seen = {x.tobytes() for s in (a.train, a.validation, a.test) for x in s.x}
    assert len(seen) == 60


def test_train_and_validation_folders_make_validation_the_test_split(
    cifar_subset, tmp_path
) -> None:
    for cls in ("cat", "dog"):
        _copy(cifar_subset, tmp_path / "train" / cls, cls, 20)
        _copy(cifar_subset, tmp_path / "validation" / cls, cls, 8, split="test")
    layout = discover(tmp_path)
    assert layout.validation is not None and layout.test is None
    ds = load_dataset(tmp_path, (24, 24), seed=0)
    assert ds.test.counts(2) == [8, 8]  # what the metrics are measured on
    assert ds.validation.counts(2) == [2, 2]  # carved from train, for early stopping
    assert ds.train.counts(2) == [18, 18]
    assert ds.train.x.shape[1:] == (24, 24, 3)


def test_splits_must_have_the_same_classes(cifar_subset, tmp_path) -> None:
    _copy(cifar_subset, tmp_path / "train" / "cat", "cat", 3)
    _copy(cifar_subset, tmp_path / "train" / "dog", "dog", 3)
    _copy(cifar_subset, tmp_path / "test" / "cat", "cat", 3)
    _copy(cifar_subset, tmp_path / "test" / "frog", "frog", 3)
    with pytest.raises(DatasetError, match=r"missing \['dog'\], extra \['frog'\]"):
        discover(tmp_path)


def test_empty_and_single_class_folders_are_refused(cifar_subset, tmp_path) -> None:
    _copy(cifar_subset, tmp_path / "cat", "cat", 3)
    with pytest.raises(DatasetError, match="single class"):
        discover(tmp_path)
    (tmp_path / "dog").mkdir()
    with pytest.raises(DatasetError, match="dog has no images"):
        discover(tmp_path)
    with pytest.raises(DatasetError, match="no class sub-folders"):
        discover(tmp_path / "cat")


def test_a_corrupt_image_is_skipped_with_a_warning(cifar_subset, tmp_path, caplog) -> None:
    for cls in ("cat", "dog"):
        _copy(cifar_subset, tmp_path / cls, cls, 10)
    bad = tmp_path / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "dog" / "README.txt").write_text("not an image, not counted")
    with caplog.at_level(logging.WARNING, logger="training"):
        ds = load_dataset(tmp_path, (32, 32))
    assert ds.skipped == [str(bad)]
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipping unreadable image" in w and str(bad) in w for w in warnings)


def test_a_class_with_only_unreadable_images_is_refused(cifar_subset, tmp_path) -> None:
    _copy(cifar_subset, tmp_path / "cat", "cat", 5)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "a.jpg").write_bytes(b"nope")
    with pytest.raises(DatasetError, match=r"no readable images left in class\(es\) \['dog'\]"):
        load_dataset(tmp_path, (32, 32))


def test_decoded_images_are_cached(cifar_subset, tmp_path) -> None:
    for cls in ("cat", "dog"):
        _copy(cifar_subset, tmp_path / "data" / cls, cls, 10)
    first = load_dataset(tmp_path / "data", (16, 16), cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = load_dataset(tmp_path / "data", (16, 16), cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.train.x, again.train.x)


def test_stratified_split_keeps_every_class_in_every_part() -> None:
    y = np.repeat([0, 1, 2], [100, 30, 3])
    train, val, test = stratified_split(y, (0.1, 0.1), seed=0)
    assert np.bincount(y[val]).tolist() == [10, 3, 1]
    assert np.bincount(y[test]).tolist() == [10, 3, 1]
    assert len(train) + len(val) + len(test) == len(y)
    assert not set(train) & set(val) and not set(val) & set(test)
    with pytest.raises(DatasetError, match="needs at least 3"):
        stratified_split(np.array([0, 0, 0, 1, 1]), (0.1, 0.1), seed=0)


def test_class_weights_only_when_imbalanced() -> None:
    weights, ratio = class_weights(np.repeat([0, 1], [50, 45]), 2)
    assert weights is None and ratio == pytest.approx(50 / 45)
    weights, ratio = class_weights(np.repeat([0, 1, 2], [80, 10, 10]), 3)
    assert ratio == 8.0
    assert weights == pytest.approx({0: 100 / 240, 1: 100 / 30, 2: 100 / 30})


def test_oversampling_balances_the_classes() -> None:
    y = np.repeat([0, 1], [40, 7])
    index = oversample(y, seed=0)
    assert np.bincount(y[index]).tolist() == [40, 40]
    assert set(index[y[index] == 1]) == set(range(40, 47))  # every minority image is used
