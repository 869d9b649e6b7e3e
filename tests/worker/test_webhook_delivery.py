"""Webhook delivery against a real HTTP receiver, real databases and a real worker process.

The receiver is a ThreadingHTTPServer on 127.0.0.1 that answers from a per-test
script and records every request; signatures are checked with the
``standardwebhooks`` library, the way a receiver would check them. Unit-level
cases call ``deliver()`` directly with a short schedule (0, 0.2 s, 0.4 s); the
integration cases start ``celery -A worker.webhook_app worker`` as a subprocess.
"""

from __future__ import annotations

import base64
import email.utils
import json
import random
import re
import socket
import threading
import time
from datetime import timedelta

import pytest
from celery.contrib.testing.worker import start_worker
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from harness.webhook_receiver import Received, Reply
from shared import webhook_events, webhook_secrets
from shared.db import make_engine, make_session_factory
from shared.models import User, WebhookAttempt, WebhookEvent, as_utc, utcnow
from shared.queue import make_celery
from tests import support
from worker import webhook_app, webhook_delivery
from worker.webhook_delivery import (
    USER_AGENT,
    DeliveryOutcome,
    DeliveryRuntime,
    decide,
    deliver,
    next_delay,
    parse_retry_after,
    webhook_client,
)

SCHEDULE = ("0", "0.2", "0.4")
TIMEOUT_S = 1.0
FINAL = ("succeeded", "failed")


# --- runtime, users and events -----------------------------------------------------------


@pytest.fixture
def wh_config(api_stack):
    return api_stack.config.replace(
        webhook_backoff_s=SCHEDULE, webhook_timeout_s=TIMEOUT_S, allow_private_urls=True
    )


def _runtime(config):
    engine = make_engine(config)
    rt = DeliveryRuntime(config, make_session_factory(engine), webhook_client(config))
    return rt, engine


@pytest.fixture
def rt(wh_config):
    runtime, engine = _runtime(wh_config)
    yield runtime
    engine.dispose()


@pytest.fixture
def owner(client, rt) -> int:
    """A user signed up through the API; returns its id."""
    username = support.new_user(client)["username"]
    with rt.sessions() as session:
        return session.scalar(select(User.id).where(User.username == username))


def new_event(rt, user_id: int, url: str, **data) -> str:
    with rt.sessions() as session:
        event_id = webhook_events.record(
            session,
            user_id=user_id,
            url=url,
            event_type="job.completed",
            data={"id": "job-1", "status": "succeeded", "label": "café ☕", **data},
        )
        session.commit()
    return event_id


def event_row(rt, event_id: str) -> WebhookEvent:
    with rt.sessions() as session:
        return session.get(WebhookEvent, event_id)


def attempt_rows(rt, event_id: str) -> list[WebhookAttempt]:
    with rt.sessions() as session:
        return list(
            session.scalars(
                select(WebhookAttempt)
                .where(WebhookAttempt.event_id == event_id)
                .order_by(WebhookAttempt.number)
            )
        )


def user_row(rt, user_id: int) -> User:
    with rt.sessions() as session:
        return session.get(User, user_id)


def deliver_until_final(rt, event_id: str, timeout: float = 5.0) -> str:
    """Call deliver() whenever the event is due (it does nothing before), until it is final."""
    return support.wait_for(
        lambda: (s := deliver(rt, event_id)) in FINAL and s, timeout, "a final status"
    )


def verified(secret: str, request: Received) -> dict:
    return Webhook(secret).verify(request.body, request.headers)


# --- outcomes -------------------------------------------------------------------------------


def test_fails_twice_then_succeeds_once_with_the_same_id(rt, owner, receiver):
    receiver.answer(500, 503, 200)
    event_id = new_event(rt, owner, receiver.url())

    assert deliver(rt, event_id) == "retrying"
    assert deliver(rt, event_id) == "retrying"  # not due yet: no second request
    assert len(receiver.received) == 1
    assert deliver_until_final(rt, event_id) == "succeeded"
    assert deliver(rt, event_id) == "succeeded"  # nothing more to do

    got = receiver.received
    assert len(got) == 3
    assert {r.headers["webhook-id"] for r in got} == {event_id}
    secret = user_row(rt, owner).webhook_secret
    assert secret.startswith("whsec_")
    payloads = [verified(secret, r) for r in got]
    assert payloads[0] == payloads[1] == payloads[2]
    assert payloads[0]["type"] == "job.completed"
    assert payloads[0]["data"]["label"] == "café ☕"
    assert got[0].headers["content-type"] == "application/json"
    assert got[0].headers["user-agent"] == USER_AGENT
    # the schedule's 0.2 s and 0.4 s, less 10 % jitter
    assert got[1].at - got[0].at >= 0.18
    assert got[2].at - got[1].at >= 0.36

    attempts = attempt_rows(rt, event_id)
    assert [(a.number, a.status_code) for a in attempts] == [(1, 500), (2, 503), (3, 200)]
    assert attempts[2].error is None and attempts[0].error == "HTTP 500"
    event = event_row(rt, event_id)
    assert (event.status, event.attempts, event.locked_until) == ("succeeded", 3, None)
    assert event.completed_at is not None


@pytest.mark.parametrize("code", [410, 404, 400])
def test_gone_and_other_client_errors_stop_at_once(rt, owner, receiver, code):
    receiver.answer(code)
    event_id = new_event(rt, owner, receiver.url())

    assert deliver(rt, event_id) == "failed"
    assert deliver(rt, event_id) == "failed"
    assert len(receiver.received) == 1
    assert [(a.number, a.status_code) for a in attempt_rows(rt, event_id)] == [(1, code)]
    assert event_row(rt, event_id).completed_at is not None


def test_redirect_is_retried_and_never_followed(rt, owner, receiver):
    receiver.answer(Reply(301, {"Location": receiver.url("/elsewhere")}), 200)
    event_id = new_event(rt, owner, receiver.url())

    assert deliver(rt, event_id) == "retrying"
    assert [r.path for r in receiver.received] == ["/hook"]
    first = attempt_rows(rt, event_id)[0]
    assert first.status_code == 301 and "not followed" in first.error
    assert deliver_until_final(rt, event_id) == "succeeded"
    assert [r.path for r in receiver.received] == ["/hook", "/hook"]


def test_retry_after_is_honoured(api_stack, owner, receiver):
    config = api_stack.config.replace(
        webhook_backoff_s=("0", "0.2", "30"), webhook_timeout_s=TIMEOUT_S
    )
    rt, engine = _runtime(config)
    try:
        receiver.answer(Reply(429, {"Retry-After": "5"}))
        event_id = new_event(rt, owner, receiver.url())
        assert deliver(rt, event_id) == "retrying"
        event, [attempt] = event_row(rt, event_id), attempt_rows(rt, event_id)
        wait = as_utc(event.next_attempt_at) - as_utc(attempt.attempted_at)
        assert wait >= timedelta(seconds=5), wait
        assert deliver(rt, event_id) == "retrying"  # not due: no request
        assert len(receiver.received) == 1
    finally:
        engine.dispose()


def test_schedule_exhausted_fails(rt, owner, receiver):
    receiver.answer(502)
    event_id = new_event(rt, owner, receiver.url())

    assert deliver_until_final(rt, event_id) == "failed"
    assert len(receiver.received) == len(SCHEDULE)
    assert [a.status_code for a in attempt_rows(rt, event_id)] == [502, 502, 502]
    assert event_row(rt, event_id).attempts == len(SCHEDULE)


def test_blocked_address_fails_without_a_request(api_stack, owner, receiver):
    rt, engine = _runtime(api_stack.config.replace(allow_private_urls=False))
    try:
        event_id = new_event(rt, owner, receiver.url())
        assert deliver(rt, event_id) == "failed"
        [attempt] = attempt_rows(rt, event_id)
        assert attempt.status_code is None
        assert attempt.error == webhook_delivery.BLOCKED_MESSAGE
        assert receiver.received == []
    finally:
        engine.dispose()


def test_timeout_is_retried(rt, owner, receiver):
    receiver.answer(Reply(200, delay_s=10), 200)
    event_id = new_event(rt, owner, receiver.url())

    started = time.monotonic()
    assert deliver(rt, event_id) == "retrying"
    assert time.monotonic() - started < TIMEOUT_S + 1
    [attempt] = attempt_rows(rt, event_id)
    assert attempt.status_code is None and "Timed out" in attempt.error
    assert deliver_until_final(rt, event_id) == "succeeded"


def test_connection_refused_is_retried(rt, owner):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    event_id = new_event(rt, owner, f"http://127.0.0.1:{port}/hook")

    assert deliver(rt, event_id) == "retrying"
    [attempt] = attempt_rows(rt, event_id)
    assert attempt.status_code is None and attempt.error.startswith("Could not connect")


def test_non_http_url_fails(rt, owner):
    event_id = new_event(rt, owner, "ftp://127.0.0.1/hook")
    assert deliver(rt, event_id) == "failed"
    assert "http and https" in attempt_rows(rt, event_id)[0].error


def test_concurrent_claims_deliver_once(rt, owner, receiver):
    receiver.answer(Reply(200, delay_s=0.3))
    event_id = new_event(rt, owner, receiver.url())
    barrier = threading.Barrier(4)
    results: list[str] = []

    def attempt() -> None:
        barrier.wait()
        results.append(deliver(rt, event_id))

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(receiver.received) == 1
    assert results.count("succeeded") >= 1
    assert set(results) <= {"succeeded", "delivering"}
    assert len(attempt_rows(rt, event_id)) == 1


def test_an_expired_claim_is_taken_over(rt, owner, receiver):
    """A worker that died mid-attempt leaves 'delivering'; once its lock expires, retry."""
    event_id = new_event(rt, owner, receiver.url())
    with rt.sessions() as session:
        session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id)
            .values(status="delivering", attempts=1, locked_until=utcnow() + timedelta(hours=1))
        )
        session.commit()
    assert deliver(rt, event_id) == "delivering"  # still locked by the "dead" worker
    assert receiver.received == []
    with rt.sessions() as session:
        session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id)
            .values(locked_until=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    assert deliver(rt, event_id) == "succeeded"
    assert [a.number for a in attempt_rows(rt, event_id)] == [2]


def test_unknown_event(rt):
    assert deliver(rt, "msg_nothing") == "missing"


# --- signatures and secret rotation -----------------------------------------------------


def test_signed_with_both_secrets_during_rotation_grace(rt, owner, receiver):
    with rt.sessions() as session:
        user = session.get(User, owner)
        old = webhook_secrets.current_secret(session, user)
        new = webhook_secrets.rotate(session, user)
        session.commit()
    assert old != new
    event_id = new_event(rt, owner, receiver.url())
    assert deliver(rt, event_id) == "succeeded"

    [request] = receiver.received
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert verified(new, request)["type"] == "job.completed"
    assert verified(old, request)["type"] == "job.completed"
    with pytest.raises(WebhookVerificationError):
        Webhook(webhook_secrets.new_secret()).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(request.body.replace(b"succeeded", b"failed"), request.headers)


def test_grace_period_ends(wh_config):
    user = User(
        webhook_secret="whsec_new",
        webhook_secret_previous="whsec_old",
        webhook_secret_rotated_at=utcnow(),
    )
    grace = timedelta(seconds=wh_config.webhook_secret_grace_s)
    now = as_utc(user.webhook_secret_rotated_at)
    assert webhook_secrets.signing_secrets(user, wh_config, now) == ["whsec_new", "whsec_old"]
    later = now + grace + timedelta(seconds=1)
    assert webhook_secrets.signing_secrets(user, wh_config, later) == ["whsec_new"]
    assert webhook_secrets.signing_secrets(User(), wh_config) == []


def test_new_secret_format():
    secret = webhook_secrets.new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    Webhook(secret)  # the library accepts it
    assert secret != webhook_secrets.new_secret()


# --- policy (pure functions) -----------------------------------------------------------


def _outcome(code=None, permanent=False) -> DeliveryOutcome:
    return DeliveryOutcome(code, None, 1, utcnow(), permanent=permanent)


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (200, "succeeded"),
        (204, "succeeded"),
        (301, "retry"),
        (307, "retry"),
        (400, "failed"),
        (401, "failed"),
        (404, "failed"),
        (408, "retry"),
        (410, "failed"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
        (None, "retry"),
    ],
)
def test_decide(code, verdict):
    assert decide(_outcome(code)) == verdict


def test_decide_permanent_error():
    assert decide(_outcome(None, permanent=True)) == "failed"


def test_next_delay_follows_the_schedule_with_jitter():
    schedule = (0.0, 5.0, 30.0, 120.0)
    rng = random.Random(7)
    for attempts, step in enumerate(schedule):
        for _ in range(50):
            delay = next_delay(schedule, attempts, rng=rng)
            assert step * 0.9 <= delay <= step * 1.1
    assert next_delay(schedule, len(schedule)) is None


def test_next_delay_respects_retry_after_up_to_the_last_step():
    schedule = (0.0, 5.0, 30.0, 120.0)
    assert next_delay(schedule, 1, retry_after_s=60) == 60
    assert next_delay(schedule, 1, retry_after_s=10**6) == 120
    assert 4.5 <= next_delay(schedule, 1, retry_after_s=1) <= 5.5
    assert next_delay(schedule, 4, retry_after_s=1) is None


def test_parse_retry_after():
    now = utcnow()
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert 88 <= parse_retry_after(date, now) <= 91
    past = email.utils.format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(past, now) == 0


# --- the real webhook worker -------------------------------------------------------------


@pytest.mark.integration
def test_a_webhook_app_built_in_process_delivers(api_stack, rt, owner, receiver, monkeypatch):
    # Before the module's worker process starts: nothing else consumes or sweeps.
    config = rt.config.replace(queue_prefix=support.new_prefix("wh-app"))
    used = []

    def deliver_and_note(runtime, event_id):
        used.append(runtime.config)
        return deliver(runtime, event_id)

    monkeypatch.setattr(webhook_delivery, "deliver", deliver_and_note)
    app = webhook_app.create_app(config)
    event_id = new_event(rt, owner, receiver.url())
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        webhook_events.dispatch(make_celery(config, main="test-sender"), config, [event_id])
        support.wait_for(
            lambda: event_row(rt, event_id).status == "succeeded", 10, "the task to deliver"
        )
    assert used == [config]
    assert len(receiver.received) == 1


@pytest.fixture(scope="module")
def webhook_worker(api_stack):
    config = api_stack.config.replace(
        webhook_backoff_s=SCHEDULE, webhook_timeout_s=TIMEOUT_S, allow_private_urls=True
    )
    worker = support.WebhookWorkerProcess(config).start()
    try:
        yield worker.wait_ready()
    finally:
        worker.stop()


@pytest.mark.integration
def test_worker_sweep_retries_until_success(webhook_worker, rt, owner, receiver):
    receiver.answer(500, 200)
    event_id = new_event(rt, owner, receiver.url())
    with rt.sessions() as session:  # recorded a while ago and never enqueued: the sweep's job
        session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id)
            .values(next_attempt_at=utcnow() - timedelta(seconds=10))
        )
        session.commit()

    support.wait_for(
        lambda: event_row(rt, event_id).status == "succeeded", 20, "the sweep to deliver"
    )
    assert [r.headers["webhook-id"] for r in receiver.received] == [event_id, event_id]
    assert [a.status_code for a in attempt_rows(rt, event_id)] == [500, 200]
    secret = user_row(rt, owner).webhook_secret
    assert all(verified(secret, r) for r in receiver.received)


@pytest.mark.integration
def test_worker_delivers_an_enqueued_event_at_once(webhook_worker, rt, owner, receiver):
    event_id = new_event(rt, owner, receiver.url())
    app = make_celery(webhook_worker.config, main="test-sender")
    webhook_events.dispatch(app, webhook_worker.config, [event_id])

    support.wait_for(
        lambda: event_row(rt, event_id).status == "succeeded", 10, "the task to deliver"
    )
    assert len(receiver.received) == 1
    # The task itself made the attempt (the sweep leaves fresh events to their task).
    done = r"Task imgclf\.deliver_webhook\[[^\]]+\] succeeded in [\d.]+s: 'succeeded'"
    support.wait_for(
        lambda: re.search(done, webhook_worker.log()), 5, "the task's success in the worker log"
    )
    assert json.loads(receiver.received[0].body)["type"] == "job.completed"
