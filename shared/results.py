"""How a job's result is stored in ``jobs.result``: compact, read back as it was written.

Every answer shows a result as ``{"predictions": [{"label", "class_id", "score"}, ...]}``
(``worker.models.top_k`` builds it; scores are rounded to 6 decimals). Stored that way,
its JSON text repeats three keys per class: about 320 of a finished job's 630 heap bytes
(issue #26). The column holds instead a flat array, three values per class, the score in
millionths::

    ["macaw", 88, 931204, "toucan", 96, 31102, ...]

which is about 115 bytes for a top 5 (pg_column_size, ImageNet labels; measured in the
report of issue #26). The labels stay in it: the API cannot always name a class id (a
trained model's class names are in the worker's MODEL_DIR, and retraining a model under
the same name may renumber them).

``StoredResult``, the column's type, packs on the way in and expands on the way out, so
everything that reads ``jobs.result`` (the ORM, Core rows, RETURNING) sees the full
form. Rows written before this form (``{"predictions": [...]}`` as stored) read unchanged,
and so does any result ``pack`` cannot store compactly and exactly (it keeps them as
they are): no migration.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import JSON
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

#: The compact form stores ``score`` as ``round(score * SCALE)``: 6 decimals, as top_k rounds.
SCALE = 1_000_000
PREDICTION_KEYS = ("label", "class_id", "score")
#: Values per class in the compact form.
WIDTH = len(PREDICTION_KEYS)


def pack(result: dict[str, Any] | None) -> list[Any] | dict[str, Any] | None:
    """The stored form of ``result``: the compact array when ``expand`` gives back an equal
    result that serializes to the same JSON, else ``result`` itself (the full form)."""
    if result is None or list(result) != ["predictions"]:
        return result
    predictions = result["predictions"]
    if not isinstance(predictions, list):
        return result
    flat: list[Any] = []
    for prediction in predictions:
        entry = _packed(prediction)
        if entry is None:
            return result
        flat += entry
    return flat


def _packed(prediction: Any) -> tuple[str, int, int] | None:
    """One class as ``(label, class_id, millionths)``, or None when that would not read
    back as the same JSON (other keys or key order, other types, a score with more than
    6 decimals, -0.0, NaN or infinity)."""
    if not isinstance(prediction, dict) or tuple(prediction) != PREDICTION_KEYS:
        return None
    label, class_id, score = prediction["label"], prediction["class_id"], prediction["score"]
    if type(label) is not str or type(class_id) is not int or type(score) is not float:
        return None
    if not math.isfinite(score) or math.copysign(1.0, score) < 0:
        return None
    micro = round(score * SCALE)
    if micro / SCALE != score:  # exact for every score top_k rounded to 6 decimals
        return None
    return label, class_id, micro


def expand(stored: list[Any] | dict[str, Any] | None) -> dict[str, Any] | None:
    """The result as answers show it, from either stored form (``pack``'s array, or a
    full result as rows before it hold)."""
    if not isinstance(stored, list):
        return stored
    triples = zip(*[iter(stored)] * WIDTH, strict=True)
    return {
        "predictions": [
            {"label": label, "class_id": class_id, "score": micro / SCALE}
            for label, class_id, micro in triples
        ]
    }


class StoredResult(TypeDecorator[Any]):
    """``jobs.result``'s type: JSON in the database (NULL for None), ``pack``'d on the way
    in and ``expand``'ed on the way out."""

    impl = JSON(none_as_null=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return pack(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return expand(value)
