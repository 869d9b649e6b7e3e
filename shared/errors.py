"""One error hierarchy for the API and the worker.

Every error the service reports carries a stable snake_case ``code`` that
clients may branch on, a human ``message``, and the HTTP status the API maps it
to. The worker stores ``code`` and ``message`` on failed jobs, so the same
names appear in job results and in HTTP error bodies.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: subclasses set ``status`` and ``code``; instances may override both."""

    status: int = 500
    code: str = "internal_error"
    message: str = "An internal error occurred."

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details
        self.headers = headers or {}
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


# --- request errors (API) ---------------------------------------------------


class BadRequest(ServiceError):
    status, code, message = 400, "bad_request", "The request could not be understood."


class InvalidJSON(BadRequest):
    code, message = "invalid_json", "The request body is not valid JSON."


class Unauthorized(ServiceError):
    status, code, message = 401, "unauthorized", "Missing or invalid credentials."


class InsufficientTokens(ServiceError):
    status, code, message = 402, "insufficient_tokens", "Not enough tokens for this request."


class Forbidden(ServiceError):
    status, code, message = 403, "forbidden", "You are not allowed to do this."


class NotFound(ServiceError):
    status, code, message = 404, "not_found", "No such resource."


class Conflict(ServiceError):
    status, code, message = 409, "conflict", "The request conflicts with the current state."


class PayloadTooLarge(ServiceError):
    status, code, message = 413, "payload_too_large", "The request body is too large."


class UnsupportedMediaType(ServiceError):
    status, code, message = 415, "unsupported_media_type", "Unsupported content type."


class ValidationFailed(ServiceError):
    status, code, message = (
        422,
        "validation_error",
        "The request is not valid; details.fields says what is wrong with each field.",
    )


class RateLimited(ServiceError):
    status, code, message = 429, "rate_limited", "Too many requests."


class ServiceUnavailable(ServiceError):
    status, code, message = 503, "service_unavailable", "A dependency is unavailable; try again."


# --- job failures (worker); stored on the job, never raised to a client ------


class JobInputError(ServiceError):
    """The job's input was bad: the job fails and its token is refunded."""

    status, code, message = 422, "invalid_input", "The input could not be used."


class FetchFailed(JobInputError):
    code, message = "fetch_failed", "The image URL could not be fetched."


class BlockedAddress(JobInputError):
    code, message = "blocked_address", "The URL points at an address that is not allowed."


class NotAnImage(JobInputError):
    code, message = "not_an_image", "The data is not an image in a supported format."


class ImageTooLarge(JobInputError):
    code, message = "image_too_large", "The image exceeds the size or pixel limit."


class DecodeBusy(ServiceError):
    """Not the input's fault: the worker's decodes held all of its pixel budget too long."""

    status, code, message = 503, "decode_busy", "The worker was too busy to decode the image."


class UploadExpired(JobInputError):
    code, message = "upload_expired", "The uploaded file is no longer available."
