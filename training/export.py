"""Publishing a trained model where the workers load it: ``<model_dir>/<name>/``.

The folder holds ``model.keras`` (the whole network, preprocessing layers included) and
``metadata.json`` (the format of ``shared.trained_models``, which the worker reads). It is
written next to its final place and renamed into it, so a worker that starts meanwhile
sees either the old complete model or the new one, never half of one.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import BUILTIN_MODELS, TRAINED_MODEL_NAME
from shared.trained_models import METADATA_FILE, METADATA_FORMAT, MODEL_FILE
from training.report import write_json

if TYPE_CHECKING:
    import keras

ROOT = Path(__file__).resolve().parents[1]


def check_name(name: str) -> str:
    """A model name as jobs will send it: lowercase letters, digits, ``_ . -``."""
    if not TRAINED_MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r} must be 1-64 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    if name in BUILTIN_MODELS:
        raise ValueError(f"model name {name!r} is a built-in model; choose another name")
    return name


def code_version() -> dict[str, Any]:
    """The git commit of this checkout (and whether it had changes), library versions."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    import keras
    import tensorflow as tf

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def export_model(
    model: keras.Model, model_dir: str | os.PathLike[str], name: str, metadata: dict[str, Any]
) -> Path:
    """Save ``model`` and ``metadata`` as ``<model_dir>/<name>/``, replacing any older one."""
    check_name(name)
    base = Path(model_dir)
    base.mkdir(parents=True, exist_ok=True)
    final = base / name
    stamp = f"{os.getpid()}-{datetime.now(UTC).strftime('%Y%m%d%H%M%S%f')}"
    tmp = base / f".{name}.tmp-{stamp}"
    tmp.mkdir()
    try:
        model.save(tmp / MODEL_FILE)
        write_json(tmp / METADATA_FILE, {"format": METADATA_FORMAT, "name": name, **metadata})
        old = None
        if final.exists():
            old = base / f".{name}.old-{stamp}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
