"""Retrying a batch's failed lines: charged again per line, run again, results updated."""

import threading
import uuid

from kombu.exceptions import OperationalError
from sqlalchemy import select

from api.services import services
from shared import batches, dispatch, jobs
from shared.models import Job
from tests import ledger_lines, support
from tests.api.test_batches import _balance, _finished, _results, rich_user  # noqa: F401


def _ledger_rows(app, job_id):
    """The line's charges and refunds by run: the charges are its batch's rows."""
    from api.services import services

    with app.app_context(), services().sessions() as session:
        user_id = session.get_one(Job, job_id).user_id
        return ledger_lines.per_job(session, user_id)[job_id]


def _batch_deliveries(client, user, batch_id, count):
    def done():
        items = client.get(f"/v1/batches/{batch_id}/deliveries", headers=user["headers"])
        items = items.get_json()["items"]
        final = [d for d in items if d["status"] == "succeeded"]
        return items if len(final) >= count else None

    return support.wait_for(done, 30, f"{count} batch.completed deliveries", interval=0.2)


def test_retried_lines_run_again_and_are_charged_again(
    stack,
    rich_user,  # noqa: F811
    photo_server,
    receiver,
):
    client, headers = stack.client(), rich_user["headers"]
    key = uuid.uuid4().hex
    urls = [
        photo_server.url("parrot.jpg"),
        photo_server.url(f"down/{key}/hot_dog.jpg"),  # 503 until the gate opens
        photo_server.url("notes.jpg"),  # not an image: stays failed
    ]
    batch = client.post(
        "/v1/batches", json={"urls": urls, "webhook": receiver.url()}, headers=headers
    ).get_json()
    done = _finished(client, rich_user, batch["id"])
    assert done["counts"]["failed"] == 2 and done["retries"] == 0
    _batch_deliveries(client, rich_user, batch["id"], 1)

    photo_server.gate(key).set()  # the host is back
    resp = client.post(
        f"/v1/batches/{batch['id']}/retry",
        json={"error_codes": ["fetch_failed"]},
        headers=headers,
    )
    assert resp.status_code == 202, resp.get_json()
    retried = resp.get_json()
    assert retried["retried"] == 1 and retried["retries"] == 1
    assert retried["status"] in {"queued", "running"} and retried["completed_at"] is None

    done = _finished(client, rich_user, batch["id"])
    assert done["status"] == "completed" and done["completed_at"]
    assert done["counts"]["succeeded"] == 2 and done["counts"]["failed"] == 1
    rows = _results(client, rich_user, batch["id"])
    assert [(r["status"], r["retries"]) for r in rows] == [
        ("succeeded", 0),
        ("succeeded", 1),
        ("failed", 0),
    ]
    assert rows[1]["predictions"][0]["label"] == "hotdog" and rows[1]["error"] is None
    # The batch completed twice, and said so twice.
    deliveries = _batch_deliveries(client, rich_user, batch["id"], 2)
    assert {d["event_type"] for d in deliveries} == {"batch.completed"}

    from api.services import services

    with stack.app.app_context(), services().sessions() as session:
        retried_id = session.scalars(
            select(Job.id).where(Job.batch_id == batch["id"], Job.batch_index == 1)
        ).one()
    assert _ledger_rows(stack.app, retried_id) == [("charge", 0), ("refund", 0), ("charge", 1)]
    tokens, total = _balance(stack, rich_user["username"])
    assert tokens == total == 100 - 2  # parrot and the retried hot dog; notes was refunded

    again = client.post(
        f"/v1/batches/{batch['id']}/retry", json={"error_codes": ["fetch_failed"]}, headers=headers
    )
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "nothing_to_retry"
    assert _balance(stack, rich_user["username"]) == (98, 98)


def test_a_retry_the_balance_cannot_cover_is_402_and_changes_nothing(stack, photo_server):
    client = stack.client()
    user = support.new_user(client)  # 5 tokens
    missing = [photo_server.url(f"missing-{uuid.uuid4().hex}.jpg") for _ in range(3)]
    failed = client.post("/v1/batches", json={"urls": missing}, headers=user["headers"])
    failed = _finished(client, user, failed.get_json()["id"])
    assert failed["counts"]["failed"] == 3 and _balance(stack, user["username"]) == (5, 5)
    good = [photo_server.url("eagle.jpg") + f"?{uuid.uuid4().hex}" for _ in range(3)]
    other = client.post("/v1/batches", json={"urls": good}, headers=user["headers"]).get_json()
    _finished(client, user, other["id"])
    assert _balance(stack, user["username"]) == (2, 2)

    resp = client.post(f"/v1/batches/{failed['id']}/retry", headers=user["headers"])
    assert resp.status_code == 402, resp.get_json()
    assert resp.get_json()["error"]["details"] == {"balance": 2, "cost": 3}
    after = client.get(f"/v1/batches/{failed['id']}", headers=user["headers"]).get_json()
    assert after == failed
    assert _balance(stack, user["username"]) == (2, 2)


def _failed_batch(app, client, user, size):
    """A batch whose lines all failed (and were refunded) through the real transition."""
    urls = [f"https://example.com/{uuid.uuid4().hex}.jpg" for _ in range(size)]
    batch = client.post("/v1/batches", json={"urls": urls}, headers=user["headers"]).get_json()
    from api.services import services

    with app.app_context(), services().sessions() as session:
        for job in session.scalars(select(Job).where(Job.batch_id == batch["id"])):
            assert jobs.mark_failed(session, job, "fetch_failed", "HTTP 503", refund=True)
        batches.complete_finished(session, [batch["id"]])
        session.commit()
    return batch


def test_concurrent_retries_charge_each_line_once(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    batch = _failed_batch(api_stack.app, client, user, 3)
    answers = []

    def retry():
        resp = api_stack.app.test_client().post(
            f"/v1/batches/{batch['id']}/retry", headers=user["headers"]
        )
        answers.append((resp.status_code, resp.get_json()))

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(status for status, _ in answers)
    assert codes == [202, 409], answers
    assert next(body for status, body in answers if status == 202)["retried"] == 3
    from api.services import services

    with api_stack.app.app_context(), services().sessions() as session:
        ids = session.scalars(select(Job.id).where(Job.batch_id == batch["id"])).all()
    for job_id in ids:
        assert _ledger_rows(api_stack.app, job_id) == [
            ("charge", 0),
            ("refund", 0),
            ("charge", 1),
        ]
    assert _balance(api_stack, user["username"]) == (2, 2)


def test_retry_refusals(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    batch = _failed_batch(api_stack.app, client, user, 1)
    other = support.new_user(client)
    url = f"/v1/batches/{batch['id']}/retry"
    assert client.post(url, headers=other["headers"]).status_code == 404
    bad = client.post(url, json={"error_codes": "fetch_failed"}, headers=user["headers"])
    assert bad.status_code == 422
    wrong = client.post(url, json={"error_codes": ["not_an_image"]}, headers=user["headers"])
    assert wrong.status_code == 409
    assert wrong.get_json()["error"]["code"] == "nothing_to_retry"

    queued = client.post(
        "/v1/batches", json={"urls": ["https://example.com/q.jpg"]}, headers=user["headers"]
    ).get_json()
    client.post(f"/v1/batches/{queued['id']}/cancel", headers=user["headers"])
    canceled = client.post(f"/v1/batches/{queued['id']}/retry", headers=user["headers"])
    assert canceled.status_code == 409
    assert canceled.get_json()["error"]["code"] == "batch_canceled"
    assert _balance(api_stack, user["username"]) == (5, 5)


def test_retry_with_an_idempotency_key_is_charged_once(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    batch = _failed_batch(api_stack.app, client, user, 2)
    headers = {**user["headers"], "Idempotency-Key": uuid.uuid4().hex}
    url = f"/v1/batches/{batch['id']}/retry"
    first = client.post(url, headers=headers)
    assert first.status_code == 202
    second = client.post(url, headers=headers)
    assert second.status_code == 202 and second.get_json() == first.get_json()
    assert _balance(api_stack, user["username"]) == (3, 3)


def test_the_same_key_sent_twice_at_once_gets_one_answer(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    batch = _failed_batch(api_stack.app, client, user, 2)
    headers = {**user["headers"], "Idempotency-Key": uuid.uuid4().hex}
    answers = []

    def retry():
        resp = api_stack.app.test_client().post(f"/v1/batches/{batch['id']}/retry", headers=headers)
        answers.append((resp.status_code, resp.get_json()))

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [status for status, _ in answers] == [202, 202], answers
    assert answers[0][1] == answers[1][1] and answers[0][1]["retried"] == 2
    assert _balance(api_stack, user["username"]) == (3, 3)


def test_a_retry_the_queue_drops_is_accepted_and_waits_in_sql(api_stack, monkeypatch):
    """Like a new batch, a retry is not undone once committed: its lines wait, charged."""
    client = api_stack.client()
    user = support.new_user(client)
    batch = _failed_batch(api_stack.app, client, user, 2)

    def down(celery, config, chunks):
        raise OperationalError("connection refused")

    monkeypatch.setattr(dispatch, "enqueue_bulk", down)
    resp = client.post(f"/v1/batches/{batch['id']}/retry", headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["retried"] == 2 and resp.get_json()["completed_at"] is None
    assert _balance(api_stack, user["username"]) == (3, 3)
    with api_stack.app.app_context(), services().sessions() as session:
        lines = session.execute(
            select(Job.status, Job.dispatched_at).where(Job.batch_id == batch["id"])
        ).all()
    assert sorted(tuple(line) for line in lines) == [("queued", None)] * 2
