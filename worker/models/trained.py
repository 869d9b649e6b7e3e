"""Models made by the training pipeline (``python -m worker.train``), served by name.

A trained model named ``NAME`` is the folder ``<MODEL_DIR>/NAME/`` with

- ``model.keras``: the whole Keras network. Its first layers are the preprocessing it was
  trained with (``Resizing`` to its input size, ``Rescaling`` of 0..255 pixels), so the
  worker hands it raw RGB values and ``preprocess`` is the identity;
- ``metadata.json``: at least ``{"format": 1, "name": NAME, "class_names": [...],
  "input_size": [width, height]}``, plus what the pipeline records about the run
  (architecture, test metrics, data fingerprint, code version).

``trained_model_class(folder)`` reads only the metadata (cheap, no keras import) and
returns an ``ImageModel`` subclass with ``name`` and ``input_size`` set, so the registry
and the worker's batching path treat it like the built-in ImageNet models: the worker
resizes each image to ``input_size``, batches, pads to bucket sizes and calls
``predict_batch``; the class names label the predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from shared.config import TRAINED_MODEL_FILE
from worker.models.base import ImageModel

if TYPE_CHECKING:
    import keras

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


class TrainedModel(ImageModel):
    """An ``ImageModel`` served from a trained-model folder (see the module docstring).

    Do not instantiate this class itself: ``trained_model_class`` makes a subclass per
    folder, with the ``name``, ``input_size``, ``folder`` and ``metadata`` class
    attributes set.
    """

    folder: ClassVar[Path]
    metadata: ClassVar[dict[str, Any]]

    def build_model(self) -> keras.Model:
        import keras

        model = keras.saving.load_model(self.folder / MODEL_FILE, compile=False)
        outputs = model.output_shape[-1]
        if outputs != len(self.metadata["class_names"]):
            raise TrainedModelError(
                f"{self.folder}: the model has {outputs} outputs for "
                f"{len(self.metadata['class_names'])} class names"
            )
        return model

    def load_labels(self) -> list[str]:
        return list(self.metadata["class_names"])

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        # Resizing and Rescaling are layers of the saved model.
        return batch


def trained_model_class(folder: str | Path, name: str | None = None) -> type[TrainedModel]:
    """The ``TrainedModel`` subclass serving ``folder``, named ``name`` (default: the folder's).

    Reads ``metadata.json`` only; the network loads in ``setup()``.

    Raises:
        TrainedModelError: see ``read_metadata``.
    """
    folder = Path(folder)
    meta = read_metadata(folder)
    width, height = meta["input_size"]
    name = name or folder.name
    return type(
        f"TrainedModel_{name}",
        (TrainedModel,),
        {
            "name": name,
            "input_size": (width, height),
            "folder": folder,
            "metadata": meta,
            "__module__": __name__,
            "__doc__": f"Trained model {name!r} from {folder}.",
        },
    )
