"""Real CIFAR-10 images for the training tests: a small subset, extracted once per session."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import subprocess
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ASSETS
from training.__main__ import main

CIFAR_TARBALL = ASSETS / "datasets" / "cifar10_jpg.tar.gz"
CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
TRAIN_PER_CLASS = 24
TEST_PER_CLASS = 8
NAME = "cifar10-test"
CORRUPT = "train/cat/9999.jpg"


def extract_cifar_subset(target: Path, per_split: dict[str, int]) -> Path:
    """Images ``0000.jpg``.. ``N-1`` of each class of each split, out of the tarball.

    Returns ``target/cifar10`` (``{train,test}/<class>/*.jpg``). GNU tar picks the named
    members in about a second; without it, Python streams the archive (slower).
    """
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"CIFAR-10 tarball not found at {CIFAR_TARBALL}")
    names = [
        f"cifar10/{split}/{c}/{i:04d}.jpg"
        for split, n in per_split.items()
        for c in CIFAR_CLASSES
        for i in range(n)
    ]
    tar_cli = shutil.which("tar")
    if tar_cli:
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [tar_cli, "-xzf", str(CIFAR_TARBALL), "-C", str(target), "--occurrence=1", *names],
            capture_output=True,
        )
        if done.returncode == 0 and all((target / n).is_file() for n in names):
            return target / "cifar10"
    return _stream_subset(target, per_split)


def _stream_subset(target: Path, per_split: dict[str, int]) -> Path:
    wanted = {(split, c): n for split, n in per_split.items() for c in CIFAR_CLASSES}
    got: Counter = Counter()
    with tarfile.open(CIFAR_TARBALL, "r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10/<split>/<class>/<file>.jpg
            if not member.isfile() or len(parts) != 4 or ".." in parts:
                continue
            key = (parts[1], parts[2])
            if got[key] >= wanted.get(key, 0):
                continue
            dest = target.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            dest.write_bytes(src.read())
            got[key] += 1
            if got == Counter(wanted):
                break
    assert got == Counter(wanted), "the CIFAR-10 tarball lacks some classes or images"
    return target / "cifar10"


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory) -> Path:
    """240 train + 80 test real CIFAR-10 JPEGs, 32x32, in the tarball's folder layout."""
    root = tmp_path_factory.mktemp("cifar-subset")
    return extract_cifar_subset(root, {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS})


@dataclass
class Trained:
    rc: int
    stdout: str
    stderr: str
    data_dir: Path
    run_dir: Path
    model_dir: Path
    metrics: dict


def run_cli(*args: str) -> tuple[int, str, str]:
    """``python -m training ARGS`` in this process: exit code, stdout, stderr + log."""
    out, err = io.StringIO(), io.StringIO()
    # Under pytest the root logger already has handlers, so main()'s basicConfig adds
    # none: catch the pipeline's log records here, where the command line shows them.
    handler = logging.StreamHandler(err)
    logger = logging.getLogger("training")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        logger.removeHandler(handler)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def trained(cifar_subset, tmp_path_factory) -> Trained:
    """One real run of the pipeline: 240 train (one corrupt more) + 80 test images, 2 epochs."""
    root = tmp_path_factory.mktemp("train-run")
    data = root / "cifar10"
    shutil.copytree(cifar_subset, data)
    (data / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 and then nothing useful")
    rc, out, err = run_cli(
        "--data", str(data), "--out", str(root / "runs"), "--model-dir", str(root / "models"),
        "--name", NAME, "--run-id", "ci", "--epochs", "2", "--batch-size", "64",
        "--width", "16", "--depth", "2", "--dense-units", "32", "--seed", "1", "--quiet",
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    run_dir = root / "runs" / "ci"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return Trained(rc, out, err, data, run_dir, root / "models", metrics)
