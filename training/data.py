"""Labelled image folders: discovery, decoding, splits and class balance.

Two layouts are understood, as ``keras.utils.image_dataset_from_directory`` lays them out:

- one sub-folder per class (``DATA/cats/*.jpg``, ``DATA/dogs/*.jpg``): split here into
  train/validation/test, 80/10/10, stratified and seeded;
- split folders that each hold the class folders (``DATA/train/...`` plus ``DATA/test/...``
  and/or ``DATA/validation/...``): the given splits are kept. When only one held-out split
  exists it is the test split (it is what the reported metrics are measured on) and the
  validation split that early stopping watches is carved out of ``train``, 10% of each
  class, so nothing the test numbers are measured on has steered training.

Images are decoded and resized exactly as the worker does at serving time
(``shared.images.decode_image`` then ``to_array``: upright, RGB, bilinear to the model's
input size) and held in memory as uint8 arrays. An image that cannot be decoded is
skipped with a warning; an empty class folder, a single class, or splits whose class
folders disagree are refused with a ``DatasetError`` that says what to fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.errors import ServiceError
from shared.images import decode_image, to_array

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TRAIN_DIRS = ("train", "training")
VALIDATION_DIRS = ("validation", "val", "valid")
TEST_DIRS = ("test", "testing")
# Decoding refuses bigger images (same order as the service's MAX_IMAGE_PIXELS default).
MAX_PIXELS = 40_000_000
# Classes whose counts differ by more than this factor count as imbalanced.
IMBALANCE_RATIO = 1.5


class DatasetError(ValueError):
    """The data folder cannot be trained on; the message says why and what to fix."""


# --- discovery -------------------------------------------------------------------


ClassFiles = dict[str, list[Path]]


@dataclass(frozen=True)
class Layout:
    """The image files of a data folder, by split and class (class names sorted)."""

    root: Path
    class_names: list[str]
    train: ClassFiles
    validation: ClassFiles | None
    test: ClassFiles | None

    @property
    def description(self) -> str:
        if self.validation is None and self.test is None:
            return "one folder per class; split 80/10/10 here (stratified, seeded)"
        parts = ["train/"]
        if self.validation is not None:
            parts.append("validation/")
        if self.test is not None:
            parts.append("test/")
        return "given splits: " + " + ".join(parts)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find(dirs: list[Path], names: Sequence[str]) -> Path | None:
    for d in dirs:
        if d.name.lower() in names:
            return d
    return None


def scan_classes(folder: Path) -> ClassFiles:
    """``{class name: sorted image files}`` for a folder of class sub-folders.

    Files are found recursively inside each class folder; only image extensions count.

    Raises:
        DatasetError: no class folders, an empty class folder, or a single class.
    """
    classes = _visible_dirs(folder)
    if not classes:
        raise DatasetError(
            f"{folder} has no class sub-folders: expected one folder per class, "
            f"e.g. {folder}/cats/*.jpg and {folder}/dogs/*.jpg"
        )
    files: ClassFiles = {}
    for class_dir in classes:
        images = sorted(
            p
            for p in class_dir.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
        )
        if not images:
            raise DatasetError(
                f"class folder {class_dir} has no images (looked for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
        files[class_dir.name] = images
    if len(files) < 2:
        only = next(iter(files))
        raise DatasetError(
            f"{folder} has a single class ({only!r}): a classifier needs at least two class folders"
        )
    return files


def discover(data_dir: str | os.PathLike[str]) -> Layout:
    """Find the splits and class folders of ``data_dir``.

    Raises:
        DatasetError: the folder is missing or not usable (see ``scan_classes``), or the
            splits' class folders differ.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    dirs = _visible_dirs(root)
    train_dir = _find(dirs, TRAIN_DIRS)
    val_dir = _find(dirs, VALIDATION_DIRS)
    test_dir = _find(dirs, TEST_DIRS)
    if train_dir is None or (val_dir is None and test_dir is None):
        train = scan_classes(root)
        return Layout(root, sorted(train), train, None, None)
    train = scan_classes(train_dir)
    names = sorted(train)
    held_out: dict[str, ClassFiles] = {}
    for label, d in (("validation", val_dir), ("test", test_dir)):
        if d is None:
            continue
        files = scan_classes(d)
        if sorted(files) != names:
            missing = sorted(set(names) - set(files))
            extra = sorted(set(files) - set(names))
            raise DatasetError(
                f"the class folders of {d} differ from {train_dir}: "
                f"missing {missing or 'none'}, extra {extra or 'none'}"
            )
        held_out[label] = files
    return Layout(root, names, train, held_out.get("validation"), held_out.get("test"))


def limit_per_class(files: ClassFiles, limit: int | None, seed: int) -> ClassFiles:
    """At most ``limit`` files per class, a seeded random sample kept in sorted order."""
    if limit is None:
        return files
    if limit < 1:
        raise DatasetError(f"--limit-per-class must be at least 1, got {limit}")
    rng = np.random.default_rng(seed)
    out: ClassFiles = {}
    for name, paths in files.items():
        if len(paths) <= limit:
            out[name] = paths
        else:
            keep = np.sort(rng.choice(len(paths), size=limit, replace=False))
            out[name] = [paths[i] for i in keep]
    return out


# --- decoding --------------------------------------------------------------------


def read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """One image as the worker would see it: uint8 ``(height, width, 3)`` at ``size`` (w, h)."""
    image = decode_image(path.read_bytes(), max_pixels=MAX_PIXELS)
    try:
        return to_array(image, size).astype(np.uint8)
    finally:
        image.close()


def _read_or_none(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    try:
        return read_image(path, size)
    except (ServiceError, OSError, ValueError, SyntaxError) as exc:
        reason = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
        log.warning("skipping unreadable image %s (%s)", path, reason)
        return None


@dataclass
class Split:
    """Decoded images (uint8 ``N x H x W x 3``) and their class ids."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> Split:
        return Split(self.x[index], self.y[index])

    def counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.y, minlength=num_classes).tolist()


def decode(
    files: ClassFiles,
    class_names: list[str],
    size: tuple[int, int],
    *,
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> tuple[Split, list[Path]]:
    """Decode every file into memory; returns the split and the files that were skipped.

    Raises:
        DatasetError: every image of some class was unreadable.
    """
    paths = [p for name in class_names for p in files[name]]
    labels = np.array([i for i, name in enumerate(class_names) for _ in files[name]], np.int64)
    cached = _cache_path(cache_dir, paths, size)
    if cached is not None and cached.is_file():
        with np.load(cached) as npz:
            ok = npz["ok"]
            split = Split(npz["x"], labels[ok])
        skipped = [p for p, good in zip(paths, ok, strict=True) if not good]
        for p in skipped:
            log.warning("skipping unreadable image %s (cached verdict)", p)
    else:
        with ThreadPoolExecutor(threads or max(2, os.cpu_count() or 2)) as pool:
            arrays = list(pool.map(lambda p: _read_or_none(p, size), paths, chunksize=64))
        ok = np.array([a is not None for a in arrays], dtype=bool)
        width, height = size
        x = np.empty((int(ok.sum()), height, width, 3), dtype=np.uint8)
        j = 0
        for a in arrays:
            if a is not None:
                x[j] = a
                j += 1
        split = Split(x, labels[ok])
        skipped = [p for p, a in zip(paths, arrays, strict=True) if a is None]
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp.npz")
            np.savez(tmp, x=split.x, ok=ok)
            tmp.replace(cached)
    counts = split.counts(len(class_names))
    empty = [name for name, n in zip(class_names, counts, strict=True) if n == 0]
    if empty:
        raise DatasetError(f"no readable images left in class(es) {empty}")
    return split, skipped


def _cache_path(cache_dir: Path | None, paths: list[Path], size: tuple[int, int]) -> Path | None:
    if cache_dir is None:
        return None
    h = hashlib.sha256(f"{size}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"\n{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return Path(cache_dir) / f"images-{h.hexdigest()[:24]}.npz"


def fingerprint(files: list[ClassFiles], root: Path) -> str:
    """A short hash of the files used (relative path and size): the data version."""
    h = hashlib.sha256()
    for split in files:
        for name in sorted(split):
            for p in split[name]:
                h.update(f"{p.relative_to(root).as_posix()}|{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


# --- splitting and balance -------------------------------------------------------


def stratified_split(y: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Index arrays for ``[rest, *fractions]``: per class, seeded, each part non-empty.

    ``fractions=(0.1, 0.1)`` gives the 80/10/10 train/validation/test split.

    Raises:
        DatasetError: a class has too few images to give every part at least one.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        if len(idx) < len(fractions) + 1:
            raise DatasetError(
                f"class id {int(cls)} has {len(idx)} image(s); splitting it "
                f"{'/'.join(str(round(100 * f)) for f in fractions)} needs at least "
                f"{len(fractions) + 1}"
            )
        idx = rng.permutation(idx)
        start = 0
        sizes = [max(1, round(f * len(idx))) for f in fractions]
        for i, n in enumerate(sizes, start=1):
            parts[i].append(idx[start : start + n])
            start += n
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


@dataclass
class Dataset:
    """Train/validation/test splits in memory, with what is known about where they came from."""

    class_names: list[str]
    image_size: tuple[int, int]  # (width, height)
    train: Split
    validation: Split
    test: Split
    source: str
    layout: str
    fingerprint: str
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict:
        k = self.num_classes
        return {
            "source": self.source,
            "layout": self.layout,
            "fingerprint": self.fingerprint,
            "class_names": self.class_names,
            "image_size": list(self.image_size),
            "counts": {
                "train": self.train.counts(k),
                "validation": self.validation.counts(k),
                "test": self.test.counts(k),
            },
            "sizes": {
                "train": len(self.train),
                "validation": len(self.validation),
                "test": len(self.test),
            },
            "skipped": self.skipped,
        }


def load_dataset(
    data_dir: str | os.PathLike[str],
    image_size: tuple[int, int],
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Discover, decode and split ``data_dir`` (see the module docstring)."""
    layout = discover(data_dir)
    names = layout.class_names
    cache = Path(cache_dir) if cache_dir else None
    train_files = limit_per_class(layout.train, limit, seed)
    val_files, test_files = (
        limit_per_class(f, limit, seed + i) if f is not None else None
        for i, f in enumerate((layout.validation, layout.test), start=1)
    )
    used = [f for f in (train_files, val_files, test_files) if f is not None]
    skipped: list[Path] = []

    def dec(files: ClassFiles) -> Split:
        split, bad = decode(files, names, image_size, cache_dir=cache)
        skipped.extend(bad)
        return split

    if val_files is None and test_files is None:
        everything = dec(train_files)
        tr, va, te = stratified_split(everything.y, (val_fraction, test_fraction), seed)
        train, validation, test = everything.take(tr), everything.take(va), everything.take(te)
    else:
        pool = dec(train_files)
        if val_files is not None and test_files is not None:
            train, validation, test = pool, dec(val_files), dec(test_files)
        else:
            held_out = test_files if test_files is not None else val_files
            assert held_out is not None  # neither given is the first branch
            test = dec(held_out)
            tr, va = stratified_split(pool.y, (val_fraction,), seed)
            train, validation = pool.take(tr), pool.take(va)
    if skipped:
        log.warning("skipped %d unreadable image(s)", len(skipped))
    root = Path(data_dir)
    return Dataset(
        class_names=names,
        image_size=image_size,
        train=train,
        validation=validation,
        test=test,
        source=str(root.resolve()),
        layout=layout.description,
        fingerprint=fingerprint(used, root),
        skipped=[str(p) for p in skipped],
    )


def class_weights(y: np.ndarray, num_classes: int) -> tuple[dict[int, float] | None, float]:
    """Balanced class weights (``n / (k * count)``) if the classes are imbalanced.

    Returns ``(weights or None, imbalance ratio = largest count / smallest count)``;
    weights are None when the ratio is at most ``IMBALANCE_RATIO``.
    """
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    ratio = float(counts.max() / max(counts.min(), 1.0))
    if ratio <= IMBALANCE_RATIO:
        return None, ratio
    weights = len(y) / (num_classes * np.maximum(counts, 1.0))
    return {i: float(w) for i, w in enumerate(weights)}, ratio


def oversample(y: np.ndarray, seed: int) -> np.ndarray:
    """Indices that repeat each class's examples (randomly, seeded) up to the largest class."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(y)
    target = counts.max()
    out = []
    for cls in np.flatnonzero(counts):
        idx = np.flatnonzero(y == cls)
        extra = rng.choice(idx, size=target - len(idx), replace=True)
        out.append(np.concatenate([idx, extra]))
    return np.sort(np.concatenate(out))
