"""Schemathesis hooks for tests/api/test_schemathesis.py (loaded with SCHEMATHESIS_HOOKS).

What the OpenAPI document cannot say by itself, and the generator needs to know:
how a JSON Lines body goes on the wire, and which models this deployment serves.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis.core.file_samples import MEDIA_TYPE_FILE_SAMPLES

# The deployment's models (MODELS), set by the test: the spec documents `model` as a
# string, since which names are served is configuration, not API.
MODELS = [m for m in os.environ.get("IMGCLF_TEST_MODELS", "").split(",") if m]


# An upload's bytes: the spec names the image types an upload may be (its encoding's
# contentType); the generator needs a file of each, not random bytes under that label.
for _media_type, _sample in MEDIA_TYPE_FILE_SAMPLES.items():
    schemathesis.openapi.media_type(_media_type, st.just(_sample))


@schemathesis.serializer("application/jsonl", "application/x-ndjson")
def json_lines(ctx: Any, value: Any) -> bytes:
    """The spec shows a JSON Lines body as the array of its items: one item per line.
    A string (the spec's example, or a negative case) goes as it is."""
    if isinstance(value, list):
        return "".join(json.dumps(item) + "\n" for item in value).encode()
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict) -> None:
    """List the deployment's models wherever the spec has a `model` field or parameter."""
    if not MODELS:
        return
    for schema in raw_schema.get("components", {}).get("schemas", {}).values():
        model = schema.get("properties", {}).get("model")
        if model is not None and model.get("type") == "string":
            model["enum"] = MODELS
    for methods in raw_schema.get("paths", {}).values():
        for operation in methods.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if parameter.get("name") == "model" and "schema" in parameter:
                    parameter["schema"]["enum"] = MODELS
