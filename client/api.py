"""A tiny wrapper over the imgclf HTTP API: one method per call the CLI makes.

It turns every failure into one of two exceptions so the CLI can map them to exit
codes in one place: :class:`ApiError` (the server answered with an error) and
:class:`Unreachable` (no answer at all).
"""

from __future__ import annotations

import mimetypes
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

CONNECT_TIMEOUT_S = 10.0
# Long-polls hold the request open for up to `wait` seconds; allow that plus slack.
READ_SLACK_S = 30.0
# A skipped wait's Retry-After is honoured up to this many seconds (a bad value must not
# stall the client for hours).
MAX_RETRY_AFTER_S = 60.0
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "canceled"})
TERMINAL_BATCH_STATUSES = frozenset({"completed", "canceled"})


class ApiError(Exception):
    """The server answered with an error object (or, from a proxy, something else)."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{message} ({code})")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    @classmethod
    def from_response(cls, resp: requests.Response) -> ApiError:
        """Read the documented ``{"error": {...}}`` body; fall back to the HTTP reason."""
        try:
            error = resp.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if not isinstance(error, dict):
            status = resp.status_code
            return cls(status, f"http_{status}", f"HTTP {status} {resp.reason}")
        details = error.get("details")
        return cls(
            resp.status_code,
            str(error.get("code") or f"http_{resp.status_code}"),
            str(error.get("message") or resp.reason),
            details if isinstance(details, dict) else None,
        )


class Unreachable(Exception):
    """No HTTP answer: refused, DNS, TLS or timeout. Distinct so scripts can retry it."""


class Client:
    """Holds the base URL and key; each method is one documented endpoint."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.session.headers["User-Agent"] = "imgclf-client/0.1"
        self._sleep = sleep
        # When the server last refused a wait (X-Wait-Skipped), the time its Retry-After
        # asks the next wait to wait for (time.monotonic()).
        self._next_wait_at = 0.0

    def _request(
        self, method: str, path: str, *, wait_s: float = 0, stream: bool = False, **kwargs: Any
    ) -> requests.Response:
        """Send one request; raise ApiError for 4xx/5xx and Unreachable for no answer.

        A request that asks to wait (``wait_s``) first honours the Retry-After of the
        last skipped wait: polling sooner is refused again at once, a spin that costs
        the server a request per turn.
        """
        url = f"{self.base_url}{path}"
        if wait_s:
            pause = self._next_wait_at - time.monotonic()
            if pause > 0:
                self._sleep(pause)
        timeout = (CONNECT_TIMEOUT_S, wait_s + READ_SLACK_S)
        try:
            resp = self.session.request(method, url, timeout=timeout, stream=stream, **kwargs)
        except requests.Timeout:
            raise Unreachable(f"{self.base_url} did not answer in time") from None
        except requests.RequestException as exc:
            raise Unreachable(f"cannot reach {self.base_url} ({_reason(exc)})") from None
        if resp.status_code >= 400:
            raise ApiError.from_response(resp)
        if wait_s and "X-Wait-Skipped" in resp.headers:
            self._next_wait_at = time.monotonic() + retry_after_s(resp)
        return resp

    def _json(self, resp: requests.Response) -> dict:
        """A 2xx that is not a JSON object means --url points at something else."""
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(
                resp.status_code,
                "invalid_response",
                f"{resp.url} answered {resp.status_code} without a JSON object; is --url right?",
            )
        return body

    # --- batches ------------------------------------------------------------------

    def create_batch(
        self,
        body: str,
        model: str | None = None,
        top_k: int | None = None,
        jsonl: bool = False,
        webhook: str | None = None,
    ) -> dict:
        """POST the file as it is (a URL list as text/plain, or JSON Lines items) so the
        server validates and numbers the lines; options go in the query string."""
        params = _params(model=model, top_k=top_k, webhook=webhook)
        content_type = "application/jsonl" if jsonl else "text/plain; charset=utf-8"
        resp = self._request(
            "POST",
            "/v1/batches",
            params=params,
            data=body.encode("utf-8"),
            headers={"Content-Type": content_type},
        )
        return self._json(resp)

    def retry_batch(self, batch_id: str, error_codes: list[str] | None = None) -> dict:
        """Re-queue the batch's failed lines (only those error codes, if given)."""
        body = {"error_codes": error_codes} if error_codes else {}
        return self._json(self._request("POST", f"/v1/batches/{batch_id}/retry", json=body))

    def get_batch(self, batch_id: str) -> dict:
        return self._json(self._request("GET", f"/v1/batches/{batch_id}"))

    def iter_results(self, batch_id: str, fmt: str = "jsonl") -> Iterator[bytes]:
        """Stream the results body in chunks: a big batch need not fit in memory."""
        params = {"format": "csv"} if fmt == "csv" else None
        resp = self._request("GET", f"/v1/batches/{batch_id}/results", params=params, stream=True)
        with resp:
            try:
                yield from resp.iter_content(chunk_size=64 * 1024)
            except requests.RequestException as exc:
                raise Unreachable(f"download from {self.base_url} broke off: {exc}") from None

    # --- single jobs ----------------------------------------------------------------

    def create_job_url(
        self, url: str, model: str | None = None, top_k: int | None = None, wait_s: int = 0
    ) -> dict:
        body = {"url": url, **_params(model=model, top_k=top_k)}
        resp = self._request("POST", "/v1/jobs", json=body, headers=_prefer(wait_s), wait_s=wait_s)
        return self._json(resp)

    def create_job_file(
        self, path: Path, model: str | None = None, top_k: int | None = None, wait_s: int = 0
    ) -> dict:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with path.open("rb") as fh:
            resp = self._request(
                "POST",
                "/v1/jobs",
                files={"file": (path.name, fh, content_type)},
                data=_params(model=model, top_k=top_k),
                headers=_prefer(wait_s),
                wait_s=wait_s,
            )
        return self._json(resp)

    def delete_job(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def delete_batch(self, batch_id: str) -> None:
        self._request("DELETE", f"/v1/batches/{batch_id}")

    def get_job(self, job_id: str, wait_s: int = 0) -> dict:
        params = {"wait": wait_s} if wait_s else None
        resp = self._request("GET", f"/v1/jobs/{job_id}", params=params, wait_s=wait_s)
        return self._json(resp)


def retry_after_s(resp: requests.Response) -> float:
    """Retry-After in seconds (delta-seconds; an HTTP-date or nonsense counts as 1 s)."""
    value = resp.headers.get("Retry-After", "").strip()
    seconds = float(value) if value.isdigit() else 1.0
    return min(seconds, MAX_RETRY_AFTER_S)


def _reason(exc: Exception) -> str:
    """urllib3's messages bury the cause ("[Errno 111] Connection refused") in retry noise."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return match.group(1).strip() if match else str(exc)


def _params(**values: Any) -> dict[str, Any]:
    """Leave out what the user did not give, so the server's defaults apply."""
    return {k: v for k, v in values.items() if v is not None}


def _prefer(wait_s: int) -> dict[str, str]:
    return {"Prefer": f"wait={wait_s}"} if wait_s else {}
