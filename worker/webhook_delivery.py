"""One webhook delivery attempt: claim in SQL, sign, POST, record, schedule the next.

SQL is the source of truth. ``deliver(rt, event_id)`` makes at most one attempt,
and only when the event is due: a conditional UPDATE claims it (pending or
retrying and ``next_attempt_at <= now``, or delivering with an expired lock),
so two workers, a task and the sweep, or a redelivered message can never send
the same due slot twice. The HTTP call runs outside any transaction; its
outcome is written in one transaction with the attempt row, conditional on the
claim still being ours.

Outcomes (see ``decide``):

- 2xx: ``succeeded``;
- 410 Gone: ``failed`` at once (the receiver asks us to stop);
- 3xx (never followed), 408, 429, 5xx, timeout, connection error: retry;
- any other 4xx, a blocked address, a URL that cannot be sent to: ``failed``.

A retry waits ``schedule[attempts]`` (±10 % jitter), at least the receiver's
``Retry-After`` capped at the last step; when the schedule is used up the event
is ``failed``. The event id is the ``webhook-id`` of every attempt and the body
is the same JSON each time; ``webhook-timestamp`` and the signatures are made
per attempt, as Standard Webhooks expects.

The HTTP client, with its SSRF policy and error mapping, is ``worker.http_client``'s,
shared with image fetches.

Known gap: the timeout bounds connecting and each socket read, not a receiver that
dribbles its status line and headers a byte at a time (image fetches have a
wall-clock watchdog for that; deliveries do not). The claim lock (timeout +
LOCK_MARGIN_S) bounds how long such an attempt holds the event; if it outlives the
lock and the event is claimed again, the stale outcome is recorded as an attempt but
changes no status.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
import requests
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from shared import logs, webhook_secrets
from shared.config import Config
from shared.db import make_engine, make_session_factory, rowcount
from shared.metrics import MetricsBuffer
from shared.models import User, WebhookAttempt, WebhookEvent, utcnow
from shared.redis_client import make_redis
from shared.status import WebhookEventStatus
from worker.http_client import Failure, HttpClient, RequestFailed, check_scheme, mapped_errors

log = logging.getLogger(__name__)

USER_AGENT = "imgclf-webhooks/0.1"
PENDING, RETRYING, DELIVERING = (
    WebhookEventStatus.PENDING,
    WebhookEventStatus.RETRYING,
    WebhookEventStatus.DELIVERING,
)
SUCCEEDED, FAILED = WebhookEventStatus.SUCCEEDED, WebhookEventStatus.FAILED
RETRY_LATER = "retry"  # a verdict, not a stored status
# How long past the HTTP timeout a claim stays ours before another worker may take it over.
LOCK_MARGIN_S = 30.0
JITTER = 0.1
MAX_ERROR_CHARS = 500
BLOCKED_MESSAGE = "The webhook URL points at an address that is not allowed."
_RETRYABLE_4XX = frozenset({408, 429})  # Request Timeout, Too Many Requests


@dataclass(frozen=True)
class DeliveryRuntime:
    """What deliveries need: config, SQL sessions and the SSRF-safe HTTP client."""

    config: Config
    sessions: sessionmaker[Session]
    http: HttpClient
    redis: redis.Redis | None = None  # for cluster metrics; None: not recorded

    @classmethod
    def build(
        cls, config: Config, sessions: sessionmaker[Session] | None = None
    ) -> DeliveryRuntime:
        return cls(
            config=config,
            sessions=sessions or make_session_factory(make_engine(config)),
            http=webhook_client(config),
            redis=make_redis(config),
        )


@dataclass(frozen=True)
class Claim:
    """An event this worker holds for one attempt, with everything needed to send it."""

    event_id: str
    number: int  # this attempt's number, 1-based (the event's attempts after the claim)
    url: str
    body: str  # the exact JSON text that is signed and sent
    secrets: tuple[str, ...]


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one attempt got: an HTTP status, or an error; ``permanent`` errors are not retried."""

    status_code: int | None
    error: str | None
    duration_ms: int
    attempted_at: datetime
    retry_after_s: float | None = None
    permanent: bool = False


# --- the one public entry point ------------------------------------------------


def deliver(rt: DeliveryRuntime, event_id: str) -> str:
    """Make one attempt if the event is due; return its status afterwards."""
    claim = claim_event(rt, event_id)
    if claim is None:
        return current_status(rt, event_id)
    outcome = send(rt, claim)
    status = finish(rt, claim, outcome)
    _count(rt, status)
    return status


def _count(rt: DeliveryRuntime, status: str) -> None:
    if rt.redis is None:
        return
    stats = MetricsBuffer()
    stats.inc("webhook_deliveries", outcome=status)
    try:
        stats.flush(rt.redis, rt.config)
    except Exception as exc:  # metrics never fail a delivery
        log.warning("could not record webhook metrics: %r", exc)


# --- SQL: claim, due events, finish ----------------------------------------------


def is_due(now: datetime):
    """The SQL condition for an event that may be attempted now."""
    return or_(
        and_(WebhookEvent.status.in_((PENDING, RETRYING)), WebhookEvent.next_attempt_at <= now),
        and_(WebhookEvent.status == DELIVERING, WebhookEvent.locked_until < now),
    )


def claim_event(rt: DeliveryRuntime, event_id: str, now: datetime | None = None) -> Claim | None:
    """Take the event for one attempt if it is due (None if not due, gone or taken)."""
    now = now or utcnow()
    lock = timedelta(seconds=rt.config.webhook_timeout_s + LOCK_MARGIN_S)
    with rt.sessions() as session:
        claimed = rowcount(
            session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id == event_id, is_due(now))
                .values(
                    status=DELIVERING,
                    locked_until=now + lock,
                    attempts=WebhookEvent.attempts + 1,
                )
                .execution_options(synchronize_session=False)
            )
        )
        if claimed != 1:
            session.rollback()
            return None
        # Both exist: the claim just matched the event, and an event goes with its user.
        event = session.get_one(WebhookEvent, event_id)
        user = session.get_one(User, event.user_id)
        webhook_secrets.current_secret(session, user)  # a user who never asked still signs
        claim = Claim(
            event_id=event.id,
            number=event.attempts,
            url=event.url,
            body=encode_payload(event.payload),
            secrets=tuple(webhook_secrets.signing_secrets(user, rt.config, now)),
        )
        session.commit()
    return claim


def due_event_ids(
    rt: DeliveryRuntime, limit: int, pending_grace_s: float = 0.0, now: datetime | None = None
) -> list[str]:
    """Events that may be attempted now, oldest due first.

    ``pending_grace_s`` leaves fresh events to the task that was enqueued for them
    (the sweep catches them after that, if the enqueue was lost).
    """
    now = now or utcnow()
    pending_due = now - timedelta(seconds=pending_grace_s)
    condition = or_(
        and_(WebhookEvent.status == PENDING, WebhookEvent.next_attempt_at <= pending_due),
        and_(WebhookEvent.status == RETRYING, WebhookEvent.next_attempt_at <= now),
        and_(WebhookEvent.status == DELIVERING, WebhookEvent.locked_until < now),
    )
    with rt.sessions() as session:
        rows = session.scalars(
            select(WebhookEvent.id)
            .where(condition)
            .order_by(WebhookEvent.next_attempt_at)
            .limit(limit)
        )
        return list(rows)


def current_status(rt: DeliveryRuntime, event_id: str) -> str:
    with rt.sessions() as session:
        status = session.scalar(select(WebhookEvent.status).where(WebhookEvent.id == event_id))
    return status or "missing"


def finish(rt: DeliveryRuntime, claim: Claim, outcome: DeliveryOutcome) -> str:
    """Record the attempt and move the event on, if the claim is still ours."""
    now = utcnow()
    verdict = decide(outcome)
    values: dict = {"locked_until": None}
    if verdict == RETRY_LATER:
        delay = next_delay(rt.config.webhook_schedule, claim.number, outcome.retry_after_s)
        if delay is None:
            verdict = FAILED
        else:
            values.update(status=RETRYING, next_attempt_at=now + timedelta(seconds=delay))
    if verdict in (SUCCEEDED, FAILED):
        values.update(status=verdict, completed_at=now)
    with rt.sessions() as session:
        session.add(attempt_row(claim, outcome))
        won = rowcount(
            session.execute(
                update(WebhookEvent)
                .where(
                    WebhookEvent.id == claim.event_id,
                    WebhookEvent.status == DELIVERING,
                    WebhookEvent.attempts == claim.number,
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        )
        session.commit()
    _log_attempt(claim, outcome, values["status"] if won else None)
    if not won:
        return current_status(rt, claim.event_id)
    return values["status"]


def attempt_row(claim: Claim, outcome: DeliveryOutcome) -> WebhookAttempt:
    return WebhookAttempt(
        event_id=claim.event_id,
        number=claim.number,
        status_code=outcome.status_code,
        error=outcome.error[:MAX_ERROR_CHARS] if outcome.error else None,
        duration_ms=outcome.duration_ms,
        attempted_at=outcome.attempted_at,
    )


def _log_attempt(claim: Claim, outcome: DeliveryOutcome, status: str | None) -> None:
    # The request id of the API call behind the event, so one id follows a job end to end.
    data = json.loads(claim.body).get("data") or {}
    logs.request_id.set(data.get("request_id"))
    log.info(
        "webhook %s attempt %d to %s: %s in %d ms -> %s",
        claim.event_id,
        claim.number,
        claim.url,
        outcome.status_code or outcome.error,
        outcome.duration_ms,
        status or "claim lost (attempt recorded, status left to the newer claim)",
    )


# --- policy ---------------------------------------------------------------------


def decide(outcome: DeliveryOutcome) -> str:
    """succeeded, failed or retry, from what the receiver (or the network) said."""
    code = outcome.status_code
    if outcome.permanent:
        return FAILED
    if code is None:  # timeout or connection error
        return RETRY_LATER
    if 200 <= code < 300:
        return SUCCEEDED
    if code == 410:
        return FAILED
    if 300 <= code < 400 or code >= 500 or code in _RETRYABLE_4XX:
        return RETRY_LATER
    return FAILED


def next_delay(
    schedule: Sequence[float],
    attempts: int,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds until the next attempt after ``attempts`` attempts; None when the schedule is done.

    ``schedule[i]`` is the delay before attempt i + 1 (the first is ``schedule[0]``,
    normally 0, counted from the event's creation).
    """
    if attempts >= len(schedule):
        return None
    jitter = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    delay = schedule[attempts] * jitter
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, schedule[-1]))
    return delay


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or utcnow())).total_seconds())


# --- HTTP -----------------------------------------------------------------------


def webhook_client(config: Config) -> HttpClient:
    """The SSRF rules of image URLs (worker.http_client); deliveries follow no redirect."""
    return HttpClient(config, timeout_s=config.webhook_timeout_s, user_agent=USER_AGENT)


def encode_payload(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def sign_headers(event_id: str, timestamp: datetime, body: str, secrets: Sequence[str]) -> dict:
    signatures = " ".join(Webhook(s).sign(event_id, timestamp, body) for s in secrets)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
    }


def send(rt: DeliveryRuntime, claim: Claim) -> DeliveryOutcome:
    """POST the signed body once; every failure becomes a DeliveryOutcome, never an exception."""
    attempted_at = utcnow()
    started = time.monotonic()

    def outcome(code: int | None = None, error: str | None = None, **kw) -> DeliveryOutcome:
        ms = int((time.monotonic() - started) * 1000)
        return DeliveryOutcome(code, error, ms, attempted_at, **kw)

    timeout = rt.config.webhook_timeout_s
    headers = sign_headers(claim.event_id, attempted_at, claim.body, claim.secrets)
    try:
        check_scheme(claim.url)
        with mapped_errors(claim.url), rt.http.session() as session:
            response = session.post(
                claim.url,
                data=claim.body.encode(),
                headers=headers,
                allow_redirects=False,
                stream=True,  # the body is not needed; do not wait for it
                timeout=(timeout, timeout),
            )
            with response:
                return outcome(
                    response.status_code,
                    _response_error(response),
                    retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
                )
    except RequestFailed as exc:
        error, permanent = _failure_error(exc, timeout)
        return outcome(error=error[:MAX_ERROR_CHARS], permanent=permanent)


def _failure_error(exc: RequestFailed, timeout_s: float) -> tuple[str, bool]:
    """What an attempt that got no response records, and whether it ends the event."""
    match exc.kind:
        case Failure.SCHEME:
            return "Only http and https webhook URLs are supported.", True
        case Failure.BLOCKED:
            return BLOCKED_MESSAGE, True
        case Failure.INVALID_URL:
            return f"The webhook URL is not valid: {exc.cause}", True
        case Failure.TIMEOUT:
            return f"Timed out after {timeout_s:g} s.", False
        case Failure.CONNECT:
            return f"Could not connect: {exc.detail()}", False
    return f"Delivery failed: {exc.detail()}", False


def _response_error(response: requests.Response) -> str | None:
    code = response.status_code
    if 200 <= code < 300:
        return None
    if response.is_redirect or 300 <= code < 400:
        location = response.headers.get("Location", "")
        return f"HTTP {code}: redirects are not followed (Location: {location})"
    return f"HTTP {code}"
