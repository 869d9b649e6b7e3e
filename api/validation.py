"""Request validation: the parser under every ``@blp.arguments``, and how marshmallow's
errors become the service's error body.

Every route module makes its blueprint from ``Blueprint`` here. Its parser differs from
flask-smorest's in two ways, both so that the error JSON stays the service's own:

- a JSON body schema that sets ``EXPECTED`` (api/schemas.py ``Body``) must get a JSON
  object, else ``422 invalid_body`` saying what to send; content types in its
  ``OTHER_TYPES`` (multipart uploads, text batches) are left to the route to read, and
  one that sets ``OPTIONAL`` may have no body at all (but not a form or text body,
  which would otherwise be ignored: ``curl -d`` sends a form);
- a validation error is raised as ``ValidationFailed`` (a ServiceError), not through
  flask's ``abort``: the app's and the seed blueprint's ServiceError handlers render
  it. A failing field that names its own ``error_code`` (``invalid_url``,
  ``invalid_webhook``, ``invalid_body``) gives that code and message when it is the
  only kind of failure; otherwise it is ``validation_error`` with ``details.fields``.
"""

from __future__ import annotations

import difflib
from typing import Any, NoReturn

import flask
import flask_smorest
import marshmallow as ma
from webargs.core import missing
from webargs.flaskparser import FlaskParser

from api.errors import invalid_body
from shared.errors import ValidationFailed


def validation_failed(messages: Any, schema: ma.Schema) -> ValidationFailed:
    """The error for marshmallow's ``messages`` on ``schema``: a field's own code where
    every failing field has one (the first in declaration order wins), else the generic
    ``validation_error`` listing each field."""
    if not isinstance(messages, dict):
        return ValidationFailed(details={"fields": messages})
    unknown = _unknown_fields(messages, schema)
    messages = {**messages, **{name: [hint] for name, hint in unknown.items()}}
    if unknown and len(unknown) == len(messages):
        return ValidationFailed(" ".join(unknown.values()), details={"fields": messages})
    coded = [
        (field.data_key or name, code)
        for name, field in schema.load_fields.items()
        if (field.data_key or name) in messages and (code := getattr(field, "error_code", None))
    ]
    if not coded or len(coded) < len(messages):
        return ValidationFailed(details={"fields": messages})
    key, code = coded[0]
    if code == "invalid_body":
        return invalid_body(getattr(schema, "EXPECTED", None) or "a JSON object")
    return ValidationFailed(_first(messages[key]), code=code)


def _unknown_fields(messages: dict, schema: ma.Schema) -> dict[str, str]:
    """For each unknown field sent, a message naming the field meant when one is close
    ("uri" -> "url"), else the fields there are; marshmallow says only "Unknown field."."""
    known = [field.data_key or name for name, field in schema.load_fields.items()]
    hints = {}
    for name, message in messages.items():
        if message != [schema.error_messages["unknown"]]:
            continue
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        meant = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(known)}."
        hints[name] = f"Unknown field {name!r}: {meant}"
    return hints


def _first(message: Any) -> str:
    while isinstance(message, (list, dict)) and message:
        message = message[0] if isinstance(message, list) else next(iter(message.values()))
    return str(message)


def load(schema: ma.Schema, data: Any) -> dict:
    """``schema.load(data)`` for data a route read itself (a multipart form, query options
    of a text body), with the same errors as ``@blp.arguments``."""
    try:
        return schema.load(data)
    except ma.ValidationError as exc:
        raise validation_failed(exc.messages, schema) from None


class Parser(FlaskParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._schemas: dict[type[ma.Schema], ma.Schema] = {}

    def _get_schema(self, argmap: Any, req: flask.Request) -> ma.Schema:
        # webargs builds a new instance of a schema class on every request, and
        # marshmallow deep-copies every declared field to do it: 0.1 ms for JobCreate,
        # five times its load (issue #22). Loading keeps no state on the instance, so
        # one per class serves every request and thread (a race builds two, harmlessly).
        if isinstance(argmap, type) and issubclass(argmap, ma.Schema):
            schema = self._schemas.get(argmap)
            if schema is None:
                schema = self._schemas[argmap] = argmap()
            return schema
        return super()._get_schema(argmap, req)

    def load_json(self, req: flask.Request, schema: ma.Schema) -> Any:
        expected = getattr(schema, "EXPECTED", None)
        if expected is None:
            return super().load_json(req, schema)
        if req.mimetype in getattr(schema, "OTHER_TYPES", ()):
            return missing  # the route reads this body itself
        if getattr(schema, "OPTIONAL", False) and not req.get_data(cache=True):
            return missing  # no body at all: the schema's defaults
        body = req.get_json(silent=True) if req.is_json else None
        if not isinstance(body, dict):
            raise invalid_body(expected)
        return body

    def handle_error(
        self,
        error: ma.ValidationError,
        req: flask.Request,
        schema: ma.Schema,
        *,
        error_status_code: int | None,
        error_headers: Any,
    ) -> NoReturn:
        # webargs nests the messages under the location ({"json": {...}}).
        messages = error.messages
        if isinstance(messages, dict) and len(messages) == 1:
            (only,) = messages.values()
            if isinstance(only, dict):
                messages = only
        raise validation_failed(messages, schema)


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint with the service's parser (see the module docstring),
    whose ``alt_response`` documents without wrapping the view."""

    ARGUMENTS_PARSER = Parser()

    def alt_response(self, *args: Any, **kwargs: Any) -> Any:
        # flask-smorest wraps the view once per alternative response, and each wrapper
        # runs on every request only to call the next one (through app.ensure_sync):
        # POST /v1/jobs documents six, about 2 % of its CPU (issue #22). Its decorator
        # is applied to a stand-in and its doc moved onto the view itself.
        document = super().alt_response(*args, **kwargs)

        def decorator(view: Any) -> Any:
            documented = document(_stand_in(view))
            view._apidoc = documented._apidoc
            return view

        return decorator


def _stand_in(view: Any) -> Any:
    """A function carrying ``view``'s doc so far, for flask-smorest to wrap and copy."""

    def stand_in() -> None:  # never called
        raise AssertionError("documentation only")

    stand_in._apidoc = getattr(view, "_apidoc", {})  # type: ignore[attr-defined]
    return stand_in
