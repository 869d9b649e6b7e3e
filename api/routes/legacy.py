"""The seed apps' endpoints, kept for older clients.

They answer with the seed apps' bodies (``status`` and ``msg`` fields, the
top-5 ``{label: percent}`` map, ``predicted_class``/``confidence_score``), but
with real HTTP status codes, and errors also carry the v1 ``error`` object.
Classification runs through the same queue, worker and batching as /v1/jobs.
"""

from __future__ import annotations

import marshmallow as ma
from flask import Response, current_app, request

from api import accounts, schemas
from api.auth import authenticate, user_by_password
from api.errors import error_response
from api.submission import submit_and_wait
from api.validation import Blueprint
from shared.errors import (
    Forbidden,
    ServiceError,
    Unauthorized,
    ValidationFailed,
)

blp = Blueprint(
    "legacy", __name__, description="The seed apps' endpoints, kept for older clients; prefer /v1."
)


def _body(schema: type[schemas.SeedCredentials], doc: type[ma.Schema]):
    """A seed body: a JSON object, loaded with ``schema``; unknown fields are ignored, as
    the seed apps ignored them; no API credentials (they are inside the body).

    ``doc`` is what the spec shows: the fields each endpoint needs in fact (``schema``
    loads them all as optional, so the endpoint answers a missing one in its own words)."""

    def decorate(view):
        view = blp.arguments(schema, unknown=ma.EXCLUDE)(view)
        body = {"required": True, "content": {"application/json": {"schema": doc}}}
        return blp.doc(security=[], requestBody=body)(view)

    return decorate


def _answers(ok: type[ma.Schema] | dict):
    """Document the seed answers: ``ok`` on 200, and every error in the seed format."""
    error = {"description": "Error (seed format)", "content": _json(schemas.SeedError)}
    return blp.doc(
        responses={
            "200": {"description": "OK", "content": _json(ok)},
            "422": error,
            "default": error,
        }
    )


def _json(schema: type[ma.Schema] | dict) -> dict:
    return {"application/json": {"schema": schema}}


# /classify's answer: the top 5 as {label: percent}, e.g. {"Blenheim_spaniel": 90.27}.
LABEL_PERCENTS = {
    "type": "object",
    "additionalProperties": {"type": "number", "minimum": 0, "maximum": 100},
    "example": {"macaw": 97.12, "lorikeet": 1.3},
}


# The seed app's in-body status codes, by our error code.
SEED_STATUS = {
    "username_taken": 301,
    "user_not_found": 301,
    "invalid_credentials": 302,
    "unauthorized": 302,
    "insufficient_tokens": 303,
    "admin_required": 304,
}


@blp.errorhandler(ServiceError)
def _seed_error(err: ServiceError):
    body = {"status": SEED_STATUS.get(err.code, err.status), "msg": err.message, **err.to_dict()}
    return error_response(err, body)


@blp.after_request
def _seed_error_fields(response: Response) -> Response:
    """Every error of a seed endpoint carries ``status`` and ``msg``, also those answered
    outside this blueprint's handler (a value the database refuses, a malformed body, a
    dependency down), as the spec's SeedError says."""
    if response.status_code < 400 or not response.is_json:
        return response
    body = response.get_json(silent=True)
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "msg" not in body:
        error = body["error"]
        seed = {
            "status": SEED_STATUS.get(error.get("code"), response.status_code),
            "msg": str(error.get("message", "")),
        }
        response.set_data(current_app.json.dumps({**seed, **body}))
    return response


@blp.route("/register", methods=["POST"])
@_body(schemas.SeedCredentials, schemas.SeedSignupDoc)
@_answers(schemas.SeedStatus)
def register(body: dict):
    """Sign up (seed format); 5 tokens."""
    # The seed app let a client make itself admin with "is_admin"; that field is ignored.
    # create_user checks the username as /v1/users does (the seed app took anything).
    accounts.create_user(body["username"] or "", body["password"] or "")
    return {"status": 200, "msg": "You have successfully signed up for the API"}


@blp.route("/token", methods=["POST"])
@_body(schemas.SeedCredentials, schemas.SeedLoginDoc)
@_answers(schemas.SeedStatus)
def token(body: dict):
    """The caller's balance (free, unlike the seed app)."""
    user = user_by_password(body["username"], body["password"])
    # Unlike the seed app, asking for the balance costs nothing.
    return {
        "status": 200,
        "msg": f"You have {user.tokens} tokens remaining.",
        "tokens": user.tokens,
    }


@blp.route("/refill", methods=["POST"])
@_body(schemas.SeedRefill, schemas.SeedRefillDoc)
@_answers(schemas.SeedStatus)
def refill(body: dict):
    """Admin: add 'refill' tokens to 'user'."""
    admin = user_by_password(body["username"], body["password"])
    if not admin.is_admin:
        raise Forbidden("You are not authorized to perform this operation.", code="admin_required")
    accounts.refill(body["user"], body["refill"], admin)
    return {"status": 200, "msg": "Refilled Successfully!"}


@blp.route("/classify", methods=["POST"])
@_body(schemas.SeedClassify, schemas.SeedClassifyDoc)
@_answers(LABEL_PERCENTS)
def classify(body: dict):
    """Classify an image URL; answers the top 5 as {label: percent}. Costs a token."""
    user = user_by_password(body["username"], body["password"])
    if not body["url"]:
        raise ValidationFailed("No url provided", code="missing_input")
    job = submit_and_wait(user, url=body["url"], top_k=5)
    # Percent with two decimals, as the seed app answered ("Blenheim_spaniel": 90.27).
    return {p["label"]: round(p["score"] * 100, 2) for p in job.result["predictions"]}


@blp.route("/predict", methods=["POST"])
@blp.doc(
    requestBody={
        "required": True,
        "content": {
            "multipart/form-data": {"schema": "SeedUpload", "encoding": schemas.IMAGE_ENCODING}
        },
    }
)
@_answers(schemas.SeedPrediction)
def predict():
    """Classify an uploaded file; answers predicted_class and confidence_score."""
    try:
        user = authenticate()
    except Unauthorized as err:
        err.message = "/predict needs HTTP Basic auth (or a Bearer API key): it costs a token."
        raise
    upload = request.files.get("file")
    if upload is None:
        raise ValidationFailed("Send the image as multipart field 'file'.", code="missing_input")
    job = submit_and_wait(user, upload=upload.read(), filename=upload.filename)
    top = job.result["predictions"][0]
    return {"predicted_class": top["label"], "confidence_score": top["score"]}
