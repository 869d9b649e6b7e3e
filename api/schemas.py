"""Request and response schemas: they validate input and generate the OpenAPI document."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import marshmallow as ma
from marshmallow import validate

from api.bulk import JOB_ERROR_CODES
from api.urls import MAX_URL_LENGTH, invalid_message, is_valid_url
from shared import webhook_events
from shared.status import JobStatus

# "$" alone also matches before a final newline, which let "name\n" through; the
# lookahead refuses that, and unlike \Z it is valid in the OpenAPI (ECMA) pattern too.
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,64}(?!\n)$")
USERNAME = validate.Regexp(USERNAME_RE, error="3 to 64 letters, digits, '_', '.' or '-'.")


BATCH_TEXT_TYPES = ("text/plain", "application/jsonl", "application/x-ndjson")
REFILL_AMOUNT = validate.Range(min=1, max=1_000_000)


class Body(ma.Schema):
    """A JSON request body that must be an object (api/validation.py): anything else is
    ``422 invalid_body``, saying to send ``EXPECTED``. Bodies of the ``OTHER_TYPES``
    (uploads, text batches) are read by the route itself."""

    EXPECTED: ClassVar[str] = "a JSON object"
    OTHER_TYPES: ClassVar[tuple[str, ...]] = ()
    OPTIONAL: ClassVar[bool] = False  # whether no body at all is the defaults


# What is_valid_url accepts, for the spec: http(s), a host, no whitespace or control
# character. A subset (printable ASCII; IPv6 literals and user info left out) that a
# generator or a client-side check can use; the server's check is api/urls.py.
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._~%!$&'()*+,;=-]+(:[0-9]{1,5})?([/?#][!-~]*)?$"
CURSOR_DOC = {"minLength": 1, "description": "next_cursor of the previous page"}


class HttpUrl(ma.fields.String):
    """An absolute http(s) URL (api/urls.py), stripped; blank or null is "not given".

    A refusal answers ``invalid_<noun>`` with one message (api/validation.py)."""

    def __init__(self, noun: str = "url", **kwargs: Any) -> None:
        kwargs.setdefault("allow_none", True)
        kwargs.setdefault("metadata", {})
        kwargs["metadata"].setdefault("maxLength", MAX_URL_LENGTH)
        kwargs["metadata"].setdefault("pattern", URL_PATTERN)
        super().__init__(**kwargs)
        self.noun, self.error_code = noun, f"invalid_{noun}"

    # None for a blank URL (the field is then absent), which String's signature cannot say.
    def _deserialize(  # type: ignore[override]
        self, value: Any, attr: Any, data: Any, **kwargs: Any
    ) -> str | None:
        if not isinstance(value, str):
            raise ma.ValidationError(invalid_message(self.noun))
        url = value.strip()
        if url and not is_valid_url(url):
            raise ma.ValidationError(invalid_message(self.noun))
        return url or None


class Lines(ma.fields.List):
    """A batch's lines, documented as a list of the inner field but loaded as sent:
    api/bulk.py checks each line, to report every bad one by its number. Not a list at
    all is ``invalid_body``."""

    error_code = "invalid_body"

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list:
        if not isinstance(value, list):
            raise self.make_error("invalid")
        return value


class ErrorBody(ma.Schema):
    code = ma.fields.String(required=True, metadata={"example": "insufficient_tokens"})
    message = ma.fields.String(required=True)
    details = ma.fields.Dict()


class ErrorSchema(ma.Schema):
    error = ma.fields.Nested(ErrorBody, required=True)


# bcrypt reads 72 bytes; JSON Schema counts characters. Any 6 to 72 printable ASCII
# characters, or any 6 to 18 characters (4 UTF-8 bytes at most each), are 6 to 72 bytes.
PASSWORD_DOC = {
    "description": "6 to 72 bytes in UTF-8",
    "anyOf": [
        {"minLength": 6, "maxLength": 72, "pattern": "^[ -~]*$"},
        {"minLength": 6, "maxLength": 18},
    ],
}


class Credentials(ma.Schema):
    username = ma.fields.String(required=True, validate=USERNAME)
    password = ma.fields.String(required=True, metadata=PASSWORD_DOC)


class UserCreated(ma.Schema):
    username = ma.fields.String()
    tokens = ma.fields.Integer()
    api_key = ma.fields.String(metadata={"description": "Shown once; store it now."})
    api_key_id = ma.fields.String()


class Me(ma.Schema):
    username = ma.fields.String()
    tokens = ma.fields.Integer()
    is_admin = ma.fields.Boolean()
    created_at = ma.fields.String()


# PostgreSQL text cannot hold U+0000: a stored string with one is 422 invalid_value.
NO_NUL = "^[^\\u0000]*$"


class KeyCreate(ma.Schema):
    name = ma.fields.String(
        load_default="", validate=validate.Length(max=100), metadata={"pattern": NO_NUL}
    )


class KeyInfo(ma.Schema):
    id = ma.fields.String()
    name = ma.fields.String()
    prefix = ma.fields.String(metadata={"description": "First characters of the key"})
    created_at = ma.fields.String()
    last_used_at = ma.fields.String(allow_none=True)


class KeyCreated(KeyInfo):
    key = ma.fields.String(metadata={"description": "Shown once; store it now."})


class KeyList(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(KeyInfo))


class StrictInteger(ma.fields.Integer):
    """A JSON integer only: 2.5 is refused, not truncated to 2; so are true and "3"."""

    def __init__(self, **kwargs) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value):
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._validated(value)


class Refill(ma.Schema):
    username = ma.fields.String(required=True)
    amount = StrictInteger(required=True, validate=REFILL_AMOUNT)


class Balance(ma.Schema):
    username = ma.fields.String()
    tokens = ma.fields.Integer()


class JobOptions(ma.Schema):
    model = ma.fields.String(metadata={"example": "mobilenet"})
    top_k = ma.fields.Integer(validate=validate.Range(min=1, max=20))
    webhook = HttpUrl(
        "webhook", metadata={"description": "http or https URL to POST job events to"}
    )
    webhook_events = ma.fields.List(
        ma.fields.String(validate=validate.OneOf(webhook_events.JOB_EVENT_CHOICES)),
        metadata={"description": 'Default: ["completed"]'},
    )


class JobCreate(Body, JobOptions):
    """JSON body; a multipart form (``JobUpload``) takes the same fields, ``file`` for ``url``."""

    EXPECTED = "a JSON object or a multipart form with a 'file' field"
    OTHER_TYPES = ("multipart/form-data",)

    url = HttpUrl(metadata={"description": "http(s) URL of a JPEG/PNG/WebP/GIF/BMP"})


class JobCreateDoc(JobOptions):
    """POST /v1/jobs' JSON body as documented: the route loads ``JobCreate`` (url optional,
    since the multipart form sends a file instead) and answers a missing url itself."""

    url = HttpUrl(
        required=True,
        allow_none=False,
        metadata={"description": "http(s) URL of a JPEG/PNG/WebP/GIF/BMP"},
    )


class JobUpload(JobOptions):
    """The multipart form of POST /v1/jobs (documentation; the route reads the form)."""

    # A form field has no null: leave it out instead.
    webhook = HttpUrl(
        "webhook",
        allow_none=False,
        metadata={"description": "http or https URL to POST job events to"},
    )

    file = ma.fields.Raw(required=True, metadata={"type": "string", "format": "binary"})


class Prediction(ma.Schema):
    label = ma.fields.String(metadata={"example": "malamute"})
    class_id = ma.fields.Integer(metadata={"example": 249})
    score = ma.fields.Float(metadata={"example": 0.2437})


class JobResult(ma.Schema):
    predictions = ma.fields.List(ma.fields.Nested(Prediction))


class JobInput(ma.Schema):
    url = ma.fields.String()
    filename = ma.fields.String()


class Job(ma.Schema):
    id = ma.fields.String()
    status = ma.fields.String(validate=validate.OneOf([s.value for s in JobStatus]))
    created_at = ma.fields.String()
    started_at = ma.fields.String(allow_none=True)
    completed_at = ma.fields.String(allow_none=True)
    input = ma.fields.Nested(JobInput)
    model = ma.fields.String()
    top_k = ma.fields.Integer()
    result = ma.fields.Nested(JobResult, allow_none=True)
    error = ma.fields.Nested(ErrorBody, allow_none=True)
    batch_id = ma.fields.String(allow_none=True)
    custom_id = ma.fields.String(
        allow_none=True, metadata={"description": "The batch line's own id (JSON Lines input)"}
    )
    retries = ma.fields.Integer(
        metadata={"description": "How many times the batch line was retried (0: first run)"}
    )
    webhook = ma.fields.Dict(allow_none=True)
    request_id = ma.fields.String(
        allow_none=True, metadata={"description": "X-Request-ID of the submitting call"}
    )


class JobList(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(Job))
    next_cursor = ma.fields.String(allow_none=True)


class WaitQuery(ma.Schema):
    wait = ma.fields.Integer(
        load_default=0,
        validate=validate.Range(min=0, max=60),
        metadata={"description": "Long-poll: seconds to wait for a final status"},
    )


class PageQuery(ma.Schema):
    limit = ma.fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = ma.fields.String(metadata=CURSOR_DOC)


class BatchOptions(ma.Schema):
    model = ma.fields.String()
    top_k = ma.fields.Integer(validate=validate.Range(min=1, max=20))
    webhook = HttpUrl("webhook", metadata={"description": "URL for the batch.completed event"})


class BatchItem(ma.Schema):
    custom_id = ma.fields.String(
        metadata={
            "description": "Your id for the line: 1 to 64 printable characters, unique "
            "within the batch; echoed in the results and the job",
            "minLength": 1,
            "maxLength": 64,
            # Printable ASCII: a subset of what the server takes (str.isprintable()).
            "pattern": "^[ -~]*$",
        }
    )
    url = HttpUrl(required=True, allow_none=False)
    top_k = ma.fields.Integer(validate=validate.Range(min=1, max=20))


class BatchCreate(Body, BatchOptions):
    """Either ``urls`` or ``items`` (one object per line, as in JSON Lines bodies); a
    text/plain or JSON Lines body takes the options from the query string instead."""

    EXPECTED = (
        '{"urls": [...]} or {"items": [{"custom_id": ..., "url": ...}]} as JSON, '
        "one URL per line as text/plain, or one item per line as application/jsonl"
    )
    OTHER_TYPES = BATCH_TEXT_TYPES

    urls = Lines(
        ma.fields.String(metadata={"pattern": URL_PATTERN, "maxLength": MAX_URL_LENGTH}),
        metadata={"minItems": 1, "maxItems": 10000},
    )
    items = Lines(ma.fields.Nested(BatchItem), metadata={"minItems": 1, "maxItems": 10000})


# An upload must be an image: the encoding names the formats the API decodes.
IMAGE_TYPES = "image/jpeg, image/png, image/webp, image/gif, image/bmp"
IMAGE_ENCODING = {"file": {"contentType": IMAGE_TYPES}}
# One URL per line, after an optional # comment (a subset a generator can use: blank lines and
# comments may go anywhere).
URL_LINES_PATTERN = (
    r"^(#[ -~]*\n)?([Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._~%!$&'()*+,;=-]+([/?#][!-~]*)?\n){1,100}$"
)


def batch_body_doc() -> dict:
    """POST /v1/batches' bodies as the spec shows them: JSON with ``urls`` or ``items``
    (never both), one URL per line, or JSON Lines (an item per line, shown as the array
    of the items)."""
    jsonl = {
        "schema": {
            "type": "array",
            "items": BatchItem,
            "minItems": 1,
            "maxItems": 10000,
            "description": "One JSON object per line (JSON Lines), not a JSON array",
        },
    }
    return {
        "application/json": {
            "schema": {
                "allOf": [BatchCreate],
                "oneOf": [{"required": ["urls"]}, {"required": ["items"]}],
            }
        },
        "text/plain": {"schema": {"type": "string", "pattern": URL_LINES_PATTERN}},
        "application/jsonl": jsonl,
        "application/x-ndjson": jsonl,
    }


class BatchRetry(Body):
    """Optional: no body retries every failed line."""

    EXPECTED = '{"error_codes": [...]} as JSON, or no body'
    OPTIONAL = True

    error_codes = ma.fields.List(
        # The enum documents the codes; api/bulk.py refuses others, naming the one meant.
        ma.fields.String(
            validate=validate.Length(min=1, max=64), metadata={"enum": list(JOB_ERROR_CODES)}
        ),
        validate=validate.Length(max=50),
        metadata={
            "description": "Retry only the failed lines with these error codes (default: all)",
            "example": ["fetch_failed"],
        },
    )


class BatchCounts(ma.Schema):
    queued = ma.fields.Integer()
    processing = ma.fields.Integer()
    succeeded = ma.fields.Integer()
    failed = ma.fields.Integer()
    canceled = ma.fields.Integer()


class BatchSchema(ma.Schema):
    id = ma.fields.String()
    status = ma.fields.String(
        validate=validate.OneOf(["queued", "running", "completed", "canceled"])
    )
    total = ma.fields.Integer()
    counts = ma.fields.Nested(BatchCounts)
    model = ma.fields.String()
    top_k = ma.fields.Integer()
    webhook = ma.fields.String(allow_none=True)
    retries = ma.fields.Integer(metadata={"description": "How many retries reopened the batch"})
    created_at = ma.fields.String()
    completed_at = ma.fields.String(allow_none=True)
    canceled_at = ma.fields.String(allow_none=True)


class BatchRetried(BatchSchema):
    retried = ma.fields.Integer(metadata={"description": "Lines re-queued (and charged)"})


class BatchList(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(BatchSchema))
    next_cursor = ma.fields.String(allow_none=True)


class ResultsQuery(ma.Schema):
    format = ma.fields.String(load_default="jsonl", validate=validate.OneOf(["jsonl", "csv"]))


class JobListQuery(ma.Schema):
    status = ma.fields.String(validate=validate.OneOf([s.value for s in JobStatus]))
    limit = ma.fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = ma.fields.String(metadata=CURSOR_DOC)


class SeedCredentials(Body):
    """The seed endpoints' bodies: credentials inside, unknown fields ignored."""

    username = ma.fields.String(load_default=None)
    password = ma.fields.String(load_default=None)


class SeedRefill(SeedCredentials):
    """The seed's /refill: an administrator's credentials, the account and the amount."""

    user = ma.fields.String(load_default="")
    refill = StrictInteger(required=True, validate=REFILL_AMOUNT)


class SeedClassify(SeedCredentials):
    url = HttpUrl(load_default=None)


class SeedUpload(ma.Schema):
    """The seed's /predict form (documentation; the route reads the form, and ignores any
    other field, as the seed app did)."""

    class Meta:
        unknown = ma.INCLUDE  # documented as additionalProperties: true

    file = ma.fields.Raw(required=True, metadata={"type": "string", "format": "binary"})


# --- the seed endpoints' documentation only: the routes load SeedCredentials & co. ------


class SeedSignupDoc(ma.Schema):
    """/register's body as documented: what create_user accepts (unknown fields ignored)."""

    class Meta:
        unknown = ma.INCLUDE

    username = ma.fields.String(required=True, validate=USERNAME)
    password = ma.fields.String(required=True, metadata=PASSWORD_DOC)


class SeedLoginDoc(ma.Schema):
    """A seed body with an account's credentials (unknown fields ignored)."""

    class Meta:
        unknown = ma.INCLUDE

    username = ma.fields.String(required=True, metadata={"pattern": NO_NUL})
    password = ma.fields.String(required=True, metadata={"pattern": NO_NUL})


class SeedRefillDoc(SeedLoginDoc):
    user = ma.fields.String(
        required=True, metadata={"description": "The account to refill", "pattern": NO_NUL}
    )
    refill = ma.fields.Integer(
        required=True, validate=REFILL_AMOUNT, metadata={"description": "Tokens to add"}
    )


class SeedClassifyDoc(SeedLoginDoc):
    url = HttpUrl(required=True, allow_none=False)


class SeedStatus(ma.Schema):
    """The seed apps' answer: an in-body ``status`` and a message (``tokens`` on /token)."""

    status = ma.fields.Integer(required=True, metadata={"example": 200})
    msg = ma.fields.String(required=True)
    tokens = ma.fields.Integer()


class SeedPrediction(ma.Schema):
    predicted_class = ma.fields.String(required=True, metadata={"example": "macaw"})
    confidence_score = ma.fields.Float(required=True, metadata={"example": 0.97})


class SeedError(ErrorSchema):
    """A seed endpoint's error: the seed apps' ``status`` and ``msg`` beside the v1 ``error``."""

    status = ma.fields.Integer(
        required=True,
        metadata={
            "description": "The seed app's code: 301 username taken or unknown user, 302 bad "
            "credentials, 303 insufficient tokens, 304 not an administrator; otherwise the "
            "HTTP status"
        },
    )
    msg = ma.fields.String(required=True, metadata={"description": "error.message again"})


class Health(ma.Schema):
    status = ma.fields.String()
    checks = ma.fields.Dict()


def location_header(what: str) -> dict:
    """OpenAPI description of the ``Location`` header that 202 answers carry."""
    return {"Location": {"description": f"Where to poll the {what}", "schema": {"type": "string"}}}
