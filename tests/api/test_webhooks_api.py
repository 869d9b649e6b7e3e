"""The webhook secret endpoints and the delivery logs of jobs and batches."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from shared import webhook_events, webhook_secrets
from shared.db import make_engine, make_session_factory
from shared.models import Batch, User, WebhookAttempt, WebhookEvent, utcnow
from tests import support
from worker.webhook_delivery import encode_payload, sign_headers


@pytest.fixture
def sessions(api_stack):
    engine = make_engine(api_stack.config)
    yield make_session_factory(engine)
    engine.dispose()


def user_id(sessions, user) -> int:
    with sessions() as session:
        return session.scalar(select(User.id).where(User.username == user["username"]))


def get_secret(client, user) -> str:
    resp = client.get("/v1/webhook-secret", headers=user["headers"])
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["secret"]


def test_secret_is_created_once_and_stable(client, user):
    secret = get_secret(client, user)
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    assert get_secret(client, user) == secret
    assert client.get("/v1/webhook-secret", headers=user["basic"]).get_json()["secret"] == secret
    assert get_secret(client, support.new_user(client)) != secret


def test_secret_needs_authentication(client):
    resp = client.get("/v1/webhook-secret")
    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "unauthorized"
    assert client.post("/v1/webhook-secret/rotate").status_code == 401


def test_rotation_keeps_the_old_secret_valid_during_the_grace_period(
    api_stack, client, user, sessions
):
    old = get_secret(client, user)
    before = utcnow()
    resp = client.post("/v1/webhook-secret/rotate", headers=user["headers"])
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    new = body["secret"]
    assert new.startswith("whsec_") and new != old
    assert get_secret(client, user) == new
    until = datetime.fromisoformat(body["previous_valid_until"].replace("Z", "+00:00"))
    grace = timedelta(seconds=api_stack.config.webhook_secret_grace_s)
    assert before + grace <= until <= utcnow() + grace

    with sessions() as session:
        row = session.get(User, user_id(sessions, user))
    assert webhook_secrets.signing_secrets(row, api_stack.config) == [new, old]
    # What a delivery signed now carries verifies with either secret on its own.
    payload = encode_payload({"type": "job.completed", "data": {"id": "x"}})
    headers = sign_headers("msg_test", utcnow(), payload, [new, old])
    assert Webhook(new).verify(payload, headers) == {"type": "job.completed", "data": {"id": "x"}}
    assert Webhook(old).verify(payload, headers)
    # After the grace period only the new one signs.
    assert webhook_secrets.signing_secrets(row, api_stack.config, until) == [new]


def _submit_job(client, user) -> str:
    resp = client.post(
        "/v1/jobs", json={"url": "http://127.0.0.1:9/cat.jpg"}, headers=user["headers"]
    )
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def _event_with_attempts(sessions, owner_id: int, **target) -> str:
    """An event delivered twice: a 500, then a 200."""
    with sessions() as session:
        event_id = webhook_events.record(
            session,
            user_id=owner_id,
            url="https://receiver.example/hook",
            event_type=webhook_events.BATCH_COMPLETED if "batch_id" in target else "job.completed",
            data={"id": "x"},
            **target,
        )
        session.flush()
        event = session.get(WebhookEvent, event_id)
        event.status, event.attempts, event.completed_at = "succeeded", 2, utcnow()
        session.add_all(
            [
                WebhookAttempt(event_id=event_id, number=1, status_code=500, error="HTTP 500"),
                WebhookAttempt(event_id=event_id, number=2, status_code=200, duration_ms=12),
            ]
        )
        session.commit()
    return event_id


def _check_listing(item: dict, event_id: str, event_type: str) -> None:
    assert item["id"] == event_id
    assert item["event_type"] == event_type
    assert item["url"] == "https://receiver.example/hook"
    assert (item["status"], item["attempts"]) == ("succeeded", 2)
    assert item["next_attempt_at"] is None
    assert item["created_at"].endswith("Z") and item["completed_at"].endswith("Z")
    log = item["attempts_log"]
    assert [(a["number"], a["status_code"], a["error"]) for a in log] == [
        (1, 500, "HTTP 500"),
        (2, 200, None),
    ]
    assert log[1]["duration_ms"] == 12 and log[0]["attempted_at"].endswith("Z")


def test_job_deliveries(client, user, sessions):
    job_id = _submit_job(client, user)
    url = f"/v1/jobs/{job_id}/deliveries"
    resp = client.get(url, headers=user["headers"])
    assert resp.status_code == 200 and resp.get_json() == {"items": []}

    event_id = _event_with_attempts(sessions, user_id(sessions, user), job_id=job_id)
    [item] = client.get(url, headers=user["headers"]).get_json()["items"]
    _check_listing(item, event_id, "job.completed")

    other = support.new_user(client)
    resp = client.get(url, headers=other["headers"])
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "job_not_found"
    resp = client.get("/v1/jobs/no-such-job/deliveries", headers=user["headers"])
    assert resp.get_json()["error"]["code"] == "job_not_found"


def test_pending_delivery_shows_when_it_is_next_tried(client, user, sessions):
    job_id = _submit_job(client, user)
    with sessions() as session:
        webhook_events.record(
            session,
            user_id=user_id(sessions, user),
            url="https://receiver.example/hook",
            event_type="job.started",
            data={"id": job_id},
            job_id=job_id,
        )
        session.commit()
    [item] = client.get(f"/v1/jobs/{job_id}/deliveries", headers=user["headers"]).get_json()[
        "items"
    ]
    assert (item["status"], item["attempts"], item["attempts_log"]) == ("pending", 0, [])
    assert item["next_attempt_at"].endswith("Z") and item["completed_at"] is None


def test_batch_deliveries(client, user, sessions):
    owner_id = user_id(sessions, user)
    with sessions() as session:
        batch = Batch(user_id=owner_id, total=1, model="mobilenet")
        session.add(batch)
        session.commit()
        batch_id = batch.id
    event_id = _event_with_attempts(sessions, owner_id, batch_id=batch_id)

    url = f"/v1/batches/{batch_id}/deliveries"
    [item] = client.get(url, headers=user["headers"]).get_json()["items"]
    _check_listing(item, event_id, "batch.completed")

    other = support.new_user(client)
    resp = client.get(url, headers=other["headers"])
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "batch_not_found"


def test_endpoints_are_in_the_openapi_document(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    for path in (
        "/v1/webhook-secret",
        "/v1/webhook-secret/rotate",
        "/v1/jobs/{job_id}/deliveries",
        "/v1/batches/{batch_id}/deliveries",
    ):
        assert path in paths, path
