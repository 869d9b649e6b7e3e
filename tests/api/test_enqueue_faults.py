"""A publish that raises after the broker already took the message (issue #14, item 9).

The fault is injected by wrapping the real enqueue: it sends for real, optionally waits
until the real worker has claimed the jobs (an event in SQL, not a sleep), then raises
as kombu does when the connection drops before the publish is confirmed. A single job
is undone (503, nothing charged) unless a worker claimed it first; a bulk batch is
never undone: the jobs it could not send wait in SQL for the next refill
(shared/dispatch.py).
"""

from __future__ import annotations

from kombu.exceptions import OperationalError
from sqlalchemy import func, select

from api import create_app, submission
from api.services import services
from shared import dispatch, queue
from shared.models import Job, User
from shared.status import JobStatus
from tests import support

CLAIM_TIMEOUT_S = 60


def _account(app, username: str) -> tuple[int, int, int]:
    """(balance, sum of the ledger, number of jobs) of a user."""
    with app.app_context(), services().sessions() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        jobs = session.scalar(select(func.count()).where(Job.user_id == user.id))
        return user.tokens, support.ledger_sum(session, user.id), jobs


def _claimed(app, job_ids) -> bool:
    with app.app_context(), services().sessions() as session:
        statuses = session.scalars(select(Job.status).where(Job.id.in_(list(job_ids)))).all()
        return len(statuses) == len(job_ids) and JobStatus.QUEUED.value not in statuses


def _delivered_then_raise(app, send, wait_for_claim: bool):
    """An enqueue that really sends, then raises; with ``wait_for_claim``, only after the
    worker has claimed what was sent (the undo then finds the jobs taken)."""

    def enqueue(celery, config, job_ids):
        send(celery, config, job_ids)
        if wait_for_claim:
            support.wait_for(lambda: _claimed(app, job_ids), CLAIM_TIMEOUT_S, "the worker's claim")
        raise OperationalError("connection lost after the publish")

    return enqueue


def test_publish_fails_after_delivery_with_no_claim_is_503_and_free(
    api_stack, monkeypatch, photo_server
):
    client = api_stack.client()
    user = support.new_user(client)
    enqueue = _delivered_then_raise(api_stack.app, queue.enqueue_jobs, wait_for_claim=False)
    monkeypatch.setattr(submission, "enqueue_jobs", enqueue)
    h = {**user["headers"], "Idempotency-Key": "after-delivery"}
    resp = client.post("/v1/jobs", json={"url": photo_server.url("dog.jpg")}, headers=h)
    assert resp.status_code == 503, resp.get_json()
    assert "nothing was charged" in resp.get_json()["error"]["message"]
    assert _account(api_stack.app, user["username"]) == (5, 5, 0)
    monkeypatch.undo()
    # The key was released with the job: a retry is a new submission.
    assert (
        client.post("/v1/jobs", json={"url": photo_server.url("dog.jpg")}, headers=h).status_code
        == 202
    )


def test_job_claimed_before_the_undo_is_accepted_and_charged_once(stack, monkeypatch, photo_server):
    client = stack.client()
    user = support.new_user(client)
    enqueue = _delivered_then_raise(stack.app, queue.enqueue_jobs, wait_for_claim=True)
    monkeypatch.setattr(submission, "enqueue_jobs", enqueue)
    resp = client.post(
        "/v1/jobs", json={"url": photo_server.url("dog.jpg")}, headers=user["headers"]
    )
    assert resp.status_code == 202, resp.get_json()
    assert _account(stack.app, user["username"]) == (4, 4, 1)
    done = client.get(f"/v1/jobs/{resp.get_json()['id']}?wait=30", headers=user["headers"])
    assert done.get_json()["status"] == "succeeded"
    assert _account(stack.app, user["username"]) == (4, 4, 1)


def _second_send_fails(send):
    """A bulk send that delivers the first chunk, then loses the connection for good (as
    on RabbitMQ, where each message goes out as it is built: on Redis a refill's chunks
    go in one pipeline, all or none)."""
    calls = []

    def enqueue(celery, config, chunks):
        calls.append(chunks)
        if len(calls) == 1:
            send(celery, config, chunks[:1])
            raise queue.BulkSendError(1) from OperationalError("connection lost")
        raise OperationalError("connection lost after the publish")

    return enqueue, calls


def test_batch_whose_sends_fail_after_the_commit_is_accepted_and_finished_later(
    stack, monkeypatch, photo_server
):
    """A bulk batch is not undone: its jobs wait in SQL, charged, for the next refill
    (here the worker's reconciler pass), and each is charged once."""
    # Chunks of two jobs, so the batch goes out as two messages and the second "fails".
    app = create_app(stack.config.replace(batch_max=2))
    client = app.test_client()
    user = support.new_user(client)
    enqueue, calls = _second_send_fails(queue.enqueue_bulk)
    monkeypatch.setattr(dispatch, "enqueue_bulk", enqueue)
    urls = [photo_server.url(f"dog.jpg?{i}") for i in range(4)]
    h = {**user["headers"], "Idempotency-Key": "partly-sent"}
    resp = client.post("/v1/batches", json={"urls": urls}, headers=h)
    assert resp.status_code == 202, resp.get_json()
    # The send failed after the first chunk; so does any further try (the stack's
    # worker may leave a note meanwhile, and the holder refills once more).
    assert len(calls) >= 1 and len(calls[0]) == 2
    body = resp.get_json()
    assert body["total"] == 4 and body["canceled_at"] is None
    assert _account(app, user["username"]) == (1, 1, 4)
    # A retry with the same key answers the same batch, and charges nothing.
    assert client.post("/v1/batches", json={"urls": urls}, headers=h).get_json()["id"] == body["id"]
    monkeypatch.undo()

    def finished():
        got = client.get(f"/v1/batches/{body['id']}", headers=user["headers"]).get_json()
        return got if got["status"] == "completed" else None

    done = support.wait_for(finished, CLAIM_TIMEOUT_S, "the reconciler to send the rest")
    assert done["counts"]["succeeded"] == 4
    assert _account(app, user["username"]) == (1, 1, 4)


def test_batch_with_the_broker_down_after_the_commit_waits_in_sql(
    api_stack, monkeypatch, photo_server
):
    app = create_app(api_stack.config.replace(batch_max=2))
    client = app.test_client()
    user = support.new_user(client)

    def down(celery, config, chunks):
        raise OperationalError("connection refused")

    monkeypatch.setattr(dispatch, "enqueue_bulk", down)
    urls = [photo_server.url(f"cat.bmp?{i}") for i in range(4)]
    resp = client.post("/v1/batches", json={"urls": urls}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["status"] == "queued"
    assert _account(app, user["username"]) == (1, 1, 4)
    with app.app_context(), services().sessions() as session:
        sent = session.scalars(
            select(Job.dispatched_at).where(Job.batch_id == resp.get_json()["id"])
        ).all()
    assert sent == [None] * 4  # waiting for the next refill, not half-sent
