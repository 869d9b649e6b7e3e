"""A long poll woken by a notification that carries its finished job answers with it and
reads no SQL (issue #22); woken by a bare one, it reads the job. Real database and Redis,
no worker: the test finishes the job as a worker would."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import event, select

from api.services import services
from shared import events, jobs
from shared.models import Job
from tests import support

HOST = "http://images.example.com"  # no worker here: the test finishes the job


@pytest.fixture
def quiet_rechecks(monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 60.0)  # only a notification can answer in time


def _waiting_submission(api_stack, client, user) -> tuple[threading.Thread, list, str]:
    """POST /v1/jobs with Prefer: wait, in a thread, once its wait is registered."""
    app = api_stack.app
    with app.app_context():  # the listener subscribed first: the wait skips its first read
        done = services().done
        done.wait("warm-up", 0, lambda: False)
        support.wait_for(lambda: done._subscribed, 10, "the subscription", 0.01)
    answers: list = []
    headers = {**user["headers"], "Prefer": "wait=30"}
    url = f"{HOST}/{uuid.uuid4().hex}.jpg"
    thread = threading.Thread(
        target=lambda: answers.append(client.post("/v1/jobs", json={"url": url}, headers=headers))
    )
    thread.start()
    with app.app_context():
        job_id = support.wait_for(lambda: _registered_job(api_stack, url), 10, "the wait", 0.01)
    return thread, answers, job_id


def _registered_job(api_stack, url: str) -> str | None:
    with services().sessions() as s:
        job_id = s.scalar(select(Job.id).where(Job.input_url == url))
    waiters = events.registration_keys(api_stack.config, job_id)[0] if job_id else None
    return job_id if waiters and services().redis.exists(waiters) else None


def _finish(job_id: str) -> dict[str, Any]:
    """Mark the job succeeded as the worker does; its body as committed."""
    with services().sessions() as s:
        jobs.mark_all_succeeded(s, {job_id: {"predictions": [{"label": "dog", "score": 0.9}]}})
        s.commit()
        return jobs.job_to_dict(s.get(Job, job_id))


def _statements(engine, run) -> int:
    """How many SQL statements ``engine`` sent while ``run()`` ran (any thread)."""
    sent = []

    def count(*_args) -> None:
        sent.append(1)

    event.listen(engine, "before_cursor_execute", count)
    try:
        run()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(sent)


@pytest.mark.parametrize("with_body", [True, False])
def test_a_woken_wait_reads_sql_only_without_the_body(
    api_stack, client, user, quiet_rechecks, with_body
):
    thread, answers, job_id = _waiting_submission(api_stack, client, user)
    app = api_stack.app
    with app.app_context():
        body = _finish(job_id)
        svc = services()

        def publish_and_answer() -> None:
            bodies = {job_id: body} if with_body else None
            events.publish_done(svc.redis, svc.config, [job_id], bodies)
            thread.join(30)

        sent = _statements(svc.engine, publish_and_answer)
    (answer,) = answers
    assert answer.status_code == 200, answer.json
    assert answer.json == body
    # Without the body, the job's read (on SQLite with its BEGIN; on PostgreSQL the
    # connection's check on checkout may come with it).
    assert (sent == 0) if with_body else (sent >= 1)
