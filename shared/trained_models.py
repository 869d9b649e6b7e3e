"""The on-disk format of a trained model: what ``training.export`` writes, the worker reads.

A trained model named ``NAME`` is the folder ``<MODEL_DIR>/NAME/`` with

- ``model.keras`` (``MODEL_FILE``): the whole Keras network, its preprocessing layers
  included;
- ``metadata.json`` (``METADATA_FILE``): at least ``{"format": 1, "name": NAME,
  "class_names": [...], "input_size": [width, height]}``, plus what the pipeline records
  about the run (architecture, test metrics, data fingerprint, code version).

Both sides import this module, so the format has one definition and neither the worker
nor the training pipeline imports the other. No keras import here: reading the metadata
is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.config import TRAINED_MODEL_FILE

MODEL_FILE = TRAINED_MODEL_FILE
METADATA_FILE = "metadata.json"
METADATA_FORMAT = 1


class TrainedModelError(ValueError):
    """A trained-model folder is missing, incomplete or inconsistent; the message says how."""


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The validated ``metadata.json`` of a trained-model folder.

    Raises:
        TrainedModelError: the folder, the model file or the metadata is missing or bad.
    """
    folder = Path(folder)
    meta_path = folder / METADATA_FILE
    if not folder.is_dir():
        raise TrainedModelError(f"no trained model folder {folder}")
    if not meta_path.is_file():
        raise TrainedModelError(f"{folder} has no {METADATA_FILE}")
    if not (folder / MODEL_FILE).is_file():
        raise TrainedModelError(f"{folder} has no {MODEL_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainedModelError(f"{meta_path} is not readable JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise TrainedModelError(f"{meta_path}: expected format {METADATA_FORMAT}")
    names = meta.get("class_names")
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise TrainedModelError(f"{meta_path}: class_names must be 2+ distinct strings")
    size = meta.get("input_size")
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise TrainedModelError(f"{meta_path}: input_size must be [width, height]")
    return meta
