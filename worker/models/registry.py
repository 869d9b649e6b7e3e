"""Which models this deployment serves, by name.

``ModelRegistry(config)`` serves exactly the names in ``config.models`` (the
``MODELS`` variable). Each worker process builds one registry and calls
``setup_all()`` once, after fork; jobs then look their model up with ``get()``.
Asking for a name that is not served raises ``ValidationFailed`` with code
``unknown_model``, never ``KeyError``.

A name that is not a built-in model is a trained model (``python -m training``):
the folder ``<config.model_dir>/<name>/`` with ``model.keras`` and ``metadata.json``
(see ``worker.models.trained``). A configured name with no such folder is
``unknown_model`` too, with a message that says where the model was looked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from shared.config import Config
from shared.errors import ValidationFailed
from worker.models.base import ImageModel
from worker.models.imagenet import InceptionV3, MobileNet, MobileNetV2
from worker.models.trained import TrainedModelError, trained_model_class

BUILTIN_MODELS: dict[str, type[ImageModel]] = {
    cls.name: cls for cls in (MobileNet, MobileNetV2, InceptionV3)
}


class ModelRegistry:
    """The models named in ``config.models``, instantiated lazily, set up by ``setup_all()``.

    Args:
        config: The service configuration (``models``, ``batch_max``, ``model_dir``).
        classes: Name-to-class table to serve from; defaults to ``BUILTIN_MODELS``
            (tests pass their own). Names not in it are looked up as trained models
            under ``config.model_dir``.
    """

    def __init__(
        self, config: Config, *, classes: Mapping[str, type[ImageModel]] | None = None
    ) -> None:
        self._config = config
        self._classes = dict(BUILTIN_MODELS if classes is None else classes)
        self._instances: dict[str, ImageModel] = {}

    def names(self) -> tuple[str, ...]:
        """The served model names, in configuration order."""
        return self._config.models

    def get(self, name: str) -> ImageModel:
        """The model instance serving ``name`` (the same object on every call).

        The instance is created on first use but not set up: in a worker,
        ``setup_all()`` has already done that.

        Raises:
            ValidationFailed: code ``unknown_model``, if ``name`` is not in
                ``config.models`` or no implementation is known for it (neither
                built in nor a usable trained-model folder).
        """
        model = self._instances.get(name)
        if model is not None:
            return model
        cls = None
        if name in self._config.models:
            try:
                cls = self._resolve(name)
            except TrainedModelError as exc:
                raise ValidationFailed(
                    f"Model {name!r} is configured but cannot be served: {exc}.",
                    code="unknown_model",
                    details={"model": name, "available": list(self.names())},
                ) from exc
        if cls is None:
            raise ValidationFailed(
                f"Unknown model {name!r}; available: {', '.join(self.names())}.",
                code="unknown_model",
                details={"model": name, "available": list(self.names())},
            )
        model = cls(
            max_batch=self._config.batch_max,
            runtime=self._config.runtime,
            runtime_cache_dir=self._config.runtime_cache_dir,
            runtime_threads=self._config.runtime_threads,
        )
        self._instances[name] = model
        return model

    def setup_all(self) -> None:
        """Instantiate and ``setup()`` every configured model. Call once per worker process."""
        for name in self.names():
            self.get(name).setup()

    def _resolve(self, name: str) -> type[ImageModel] | None:
        """The class implementing ``name``: a built-in class, else a trained model's.

        Raises:
            TrainedModelError: ``name`` is not built in and ``<model_dir>/<name>/``
                is missing or unusable (no model file, bad metadata).
        """
        cls = self._classes.get(name)
        if cls is not None:
            return cls
        if not name or Path(name).name != name or name.startswith("."):
            return None  # never a path outside model_dir
        cls = trained_model_class(Path(self._config.model_dir) / name, name)
        self._classes[name] = cls
        return cls
