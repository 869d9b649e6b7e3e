"""Models made by the training pipeline (``python -m training``), served by name.

A trained model named ``NAME`` is the folder ``<MODEL_DIR>/NAME/`` that
``shared.trained_models`` defines: ``model.keras`` and ``metadata.json``. The network's
first layers are the preprocessing it was trained with (``Resizing`` to its input size,
``Rescaling`` of 0..255 pixels), so the worker hands it raw RGB values and ``preprocess``
is the identity.

``trained_model_class(folder)`` reads only the metadata (cheap, no keras import) and
returns an ``ImageModel`` subclass with ``name`` and ``input_size`` set, so the registry
and the worker's batching path treat it like the built-in ImageNet models: the worker
resizes each image to ``input_size``, batches, pads to bucket sizes and calls
``predict_batch``; the class names label the predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from shared.trained_models import MODEL_FILE, TrainedModelError, read_metadata
from worker.models.base import ImageModel

if TYPE_CHECKING:
    import keras


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
