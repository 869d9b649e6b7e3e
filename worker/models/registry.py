"""Which models this deployment serves, by name.

``ModelRegistry(config)`` serves exactly the names in ``config.models`` (the
``MODELS`` variable). Each worker process builds one registry and calls
``setup_all()`` once, after fork; jobs then look their model up with ``get()``.
Asking for a name that is not served raises ``ValidationFailed`` with code
``unknown_model``, never ``KeyError``.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.config import Config
from shared.errors import ValidationFailed
from worker.models.base import ImageModel
from worker.models.imagenet import InceptionV3, MobileNet, MobileNetV2

BUILTIN_MODELS: dict[str, type[ImageModel]] = {
    cls.name: cls for cls in (MobileNet, MobileNetV2, InceptionV3)
}


class ModelRegistry:
    """The models named in ``config.models``, instantiated lazily, set up by ``setup_all()``.

    Args:
        config: The service configuration (``models``, ``batch_max``).
        classes: Name-to-class table to serve from; defaults to ``BUILTIN_MODELS``
            (tests pass their own).
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
                ``config.models`` or no implementation is known for it.
        """
        model = self._instances.get(name)
        if model is not None:
            return model
        cls = self._resolve(name) if name in self._config.models else None
        if cls is None:
            raise ValidationFailed(
                f"Unknown model {name!r}; available: {', '.join(self.names())}.",
                code="unknown_model",
                details={"model": name, "available": list(self.names())},
            )
        model = cls(max_batch=self._config.batch_max)
        self._instances[name] = model
        return model

    def setup_all(self) -> None:
        """Instantiate and ``setup()`` every configured model. Call once per worker process."""
        for name in self.names():
            self.get(name).setup()

    def _resolve(self, name: str) -> type[ImageModel] | None:
        """The class implementing ``name``, or None if there is none.

        EXTENSION POINT (not implemented): models produced by the training
        pipeline will be found here by name under a model directory setting (e.g. a
        saved ``.keras`` file plus its label list) and wrapped in an
        ``ImageModel`` subclass. Until that exists, only built-in names
        resolve, and every other name is ``unknown_model``.
        """
        return self._classes.get(name)
