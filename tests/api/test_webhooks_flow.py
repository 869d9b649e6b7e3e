"""Webhooks through the whole stack: API -> worker records events -> webhook worker delivers."""

import json
import time
from datetime import timedelta

import pytest
from standardwebhooks.webhooks import Webhook

from harness.webhook_receiver import Reply
from shared.models import utcnow
from tests import support
from worker import webhook_delivery
from worker.webhook_delivery import DeliveryRuntime


@pytest.fixture
def hook_user(stack):
    return support.new_user(stack.client())


def _deliveries(client, user, kind, rid):
    resp = client.get(f"/v1/{kind}/{rid}/deliveries", headers=user["headers"])
    assert resp.status_code == 200
    return resp.get_json()["items"]


def _final_deliveries(client, user, kind, rid, count=1):
    def done():
        items = _deliveries(client, user, kind, rid)
        final = [d for d in items if d["status"] in {"succeeded", "failed"}]
        return items if len(final) >= count else None

    return support.wait_for(done, 30, f"{count} final deliveries for {kind} {rid}", interval=0.2)


def test_job_completed_is_retried_until_delivered_and_signed(
    stack, hook_user, receiver, photo_server
):
    client = stack.client()
    receiver.answer(500, 503, 200)
    job = client.post(
        "/v1/jobs",
        json={"url": photo_server.url("parrot.jpg"), "webhook": receiver.url()},
        headers={**hook_user["headers"], "Prefer": "wait=30"},
    ).get_json()
    assert job["status"] == "succeeded"
    assert job["webhook"] == {"url": receiver.url(), "events": ["completed"]}

    (delivery,) = _final_deliveries(client, hook_user, "jobs", job["id"])
    assert delivery["status"] == "succeeded" and delivery["event_type"] == "job.completed"
    assert [a["status_code"] for a in delivery["attempts_log"]] == [500, 503, 200]
    assert len(receiver.received) == 3
    assert {r.headers["webhook-id"] for r in receiver.received} == {delivery["id"]}

    secret = client.get("/v1/webhook-secret", headers=hook_user["headers"]).get_json()["secret"]
    payload = Webhook(secret).verify(receiver.received[-1].body, receiver.received[-1].headers)
    assert payload["type"] == "job.completed"
    assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
    assert payload["data"]["result"]["predictions"][0]["label"] == "macaw"


def test_started_and_completed_events(stack, hook_user, receiver, photo_server):
    client = stack.client()
    job = client.post(
        "/v1/jobs",
        json={
            "url": photo_server.url("bird.bmp"),
            "webhook": receiver.url(),
            "webhook_events": ["started", "completed"],
        },
        headers=hook_user["headers"],
    ).get_json()
    items = _final_deliveries(client, hook_user, "jobs", job["id"], count=2)
    assert sorted(d["event_type"] for d in items) == ["job.completed", "job.started"]
    assert all(d["status"] == "succeeded" for d in items)
    types = {
        json.loads(r.body)["data"]["status"]: json.loads(r.body)["type"] for r in receiver.received
    }
    assert types == {"processing": "job.started", "succeeded": "job.completed"}


def test_batch_completed_is_sent_once(stack, hook_user, receiver, photo_server):
    client = stack.client()
    urls = [photo_server.url(n) for n in ("dog.jpg", "eagle.jpg", "missing.jpg")]
    batch = client.post(
        "/v1/batches", json={"urls": urls, "webhook": receiver.url()}, headers=hook_user["headers"]
    ).get_json()
    (delivery,) = _final_deliveries(client, hook_user, "batches", batch["id"])
    assert delivery["event_type"] == "batch.completed" and delivery["status"] == "succeeded"
    # Only a due event is ever sent (by its task or by a sweep): none of the batch's is
    # due, even a day from now, so no duplicate can come.
    rt = DeliveryRuntime.build(stack.config)
    due = webhook_delivery.due_event_ids(rt, 100_000, now=utcnow() + timedelta(days=1))
    assert delivery["id"] not in due
    assert len(receiver.received) == 1
    payload = json.loads(receiver.received[0].body)
    assert payload["data"]["status"] == "completed"
    assert payload["data"]["counts"]["succeeded"] == 2
    assert payload["data"]["counts"]["failed"] == 1


def test_a_hanging_receiver_does_not_slow_classification(stack, hook_user, receiver, photo_server):
    client = stack.client()
    receiver.answer(Reply(200, delay_s=20))
    slow = client.post(
        "/v1/jobs",
        json={"url": photo_server.url("dog.jpg"), "webhook": receiver.url()},
        headers={**hook_user["headers"], "Prefer": "wait=30"},
    ).get_json()
    assert slow["status"] == "succeeded"
    support.wait_for(lambda: receiver.received, 10, "the webhook worker to call the receiver")
    start = time.monotonic()
    other = client.post(
        "/v1/jobs",
        json={"url": photo_server.url("hot_dog.jpg")},
        headers={**hook_user["headers"], "Prefer": "wait=30"},
    ).get_json()
    assert other["status"] == "succeeded"
    assert time.monotonic() - start < 5  # while the receiver still holds its connection
    receiver.release.set()
