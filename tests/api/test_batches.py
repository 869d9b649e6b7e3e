"""Bulk batches end to end, with the real worker and model."""

import csv
import io
import json
import uuid

import pytest
from sqlalchemy import select

from shared import ledger
from shared.models import Job, LedgerEntry, User
from tests import ledger_lines, support

DOG_BREEDS = range(151, 269)


@pytest.fixture
def rich_user(stack):
    """A user with 100 tokens (refilled by an admin through the API)."""
    return support.funded_user(stack.client(), stack.app, 95)


def _finished(client, user, batch_id, timeout=180):
    def done():
        batch = client.get(f"/v1/batches/{batch_id}", headers=user["headers"]).get_json()
        return (
            batch
            if batch["status"] in {"completed", "canceled"}
            and not (batch["counts"]["queued"] or batch["counts"]["processing"])
            else None
        )

    return support.wait_for(done, timeout, f"batch {batch_id} to finish", interval=0.2)


def _results(client, user, batch_id, fmt="jsonl"):
    resp = client.get(f"/v1/batches/{batch_id}/results?format={fmt}", headers=user["headers"])
    assert resp.status_code == 200
    text = resp.get_data(as_text=True)
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    return [json.loads(line) for line in text.splitlines()]


def _balance(stack, username):
    from api.services import services

    with stack.app.app_context(), services().sessions() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        return user.tokens, support.ledger_sum(session, user.id)


def test_a_mixed_batch_of_50(stack, rich_user, photo_server):
    client = stack.client()
    tag = uuid.uuid4().hex[:6]
    good = ["parrot.jpg", "dog.jpg", "hot_dog.jpg", "bird.bmp", "cat.bmp"]
    lines = []
    for i in range(50):
        if i % 10 == 3:
            lines.append(photo_server.url(f"missing-{i}.jpg"))
        elif i % 10 == 7:
            lines.append(photo_server.url("notes.jpg"))
        else:
            lines.append(photo_server.url(good[i % 5]) + f"?{tag}")  # duplicates, on purpose
    body = "# my photos\n\n" + "\n".join(lines) + "\n"
    before = _balance(stack, rich_user["username"])[0]
    resp = client.post(
        "/v1/batches", data=body, content_type="text/plain", headers=rich_user["headers"]
    )
    assert resp.status_code == 202, resp.get_json()
    batch = resp.get_json()
    assert batch["total"] == 50 and batch["status"] in {"queued", "running"}
    assert sum(batch["counts"].values()) == 50

    done = _finished(client, rich_user, batch["id"])
    assert done["status"] == "completed" and done["completed_at"]
    assert done["counts"] == {
        "queued": 0,
        "processing": 0,
        "succeeded": 40,
        "failed": 10,
        "canceled": 0,
    }
    tokens, total = _balance(stack, rich_user["username"])
    assert tokens == total == before - 50 + 10

    rows = _results(client, rich_user, batch["id"])
    assert [r["index"] for r in rows] == list(range(50))
    assert [r["url"] for r in rows] == lines
    expected = {"parrot.jpg": "macaw", "hot_dog.jpg": "hotdog", "bird.bmp": "chickadee"}
    for row in rows:
        name = row["url"].rsplit("/", 1)[1].split("?")[0]
        if name.startswith("missing"):
            assert (row["status"], row["error"]["code"]) == ("failed", "fetch_failed")
        elif name == "notes.jpg":
            assert (row["status"], row["error"]["code"]) == ("failed", "not_an_image")
        else:
            assert row["status"] == "succeeded" and row["error"] is None
            top = row["predictions"][0]
            if name in expected:
                assert top["label"] == expected[name]
            elif name == "dog.jpg":
                assert top["class_id"] in DOG_BREEDS
    # Each distinct URL was downloaded once, though it appears 8 times.
    for name in good:
        assert photo_server.hits.count(f"/{name}?{tag}") == 1, name

    table = _results(client, rich_user, batch["id"], "csv")
    assert len(table) == 50 and table[0]["top_label"] == "macaw"


def test_bad_lines_are_reported_and_nothing_is_created(stack, rich_user, photo_server):
    client = stack.client()
    body = f"{photo_server.url('dog.jpg')}\n# fine\nnot-a-url\n\nftp://x/y.jpg\n"
    resp = client.post(
        "/v1/batches", data=body, content_type="text/plain", headers=rich_user["headers"]
    )
    assert resp.status_code == 422
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_urls" and error["details"]["lines"] == [3, 5]
    resp = client.post(
        "/v1/batches",
        json={"urls": [photo_server.url("dog.jpg"), 42]},
        headers=rich_user["headers"],
    )
    assert resp.status_code == 422 and resp.get_json()["error"]["details"]["lines"] == [2]
    assert (
        client.post("/v1/batches", json={"urls": []}, headers=rich_user["headers"]).get_json()[
            "error"
        ]["code"]
        == "empty_batch"
    )
    listed = client.get("/v1/batches", headers=rich_user["headers"]).get_json()
    assert listed["items"] == []
    assert _balance(stack, rich_user["username"]) == (100, 100)


def test_a_batch_larger_than_the_balance_is_402(stack, photo_server):
    client = stack.client()
    user = support.new_user(client)
    resp = client.post(
        "/v1/batches", json={"urls": [photo_server.url("dog.jpg")] * 6}, headers=user["headers"]
    )
    assert resp.status_code == 402
    assert client.get("/v1/batches", headers=user["headers"]).get_json()["items"] == []
    assert _balance(stack, user["username"]) == (5, 5)


def test_cancel_mid_batch_never_charges_a_canceled_job(stack, rich_user, photo_server):
    from shared import dispatch

    client = stack.client()
    # Past the bulk window: the lines beyond it wait in SQL, so the cancel finds some
    # however fast the worker claims the lines sent (on a busy machine it had claimed
    # all of a 100-line batch, which the window then covered, before the cancel came).
    with stack.app.app_context():
        from api.services import services

        size = dispatch.window(services().redis, stack.config) + 40
    sessions = _sessions(stack.config)
    with sessions() as session:
        ledger.grant(session, _user_id(sessions, rich_user["username"]), size - 100, ledger.REFILL)
        session.commit()
    urls = [photo_server.url("kite.jpg") + f"?c{i}" for i in range(size)]
    batch = client.post("/v1/batches", json={"urls": urls}, headers=rich_user["headers"]).get_json()
    resp = client.post(f"/v1/batches/{batch['id']}/cancel", headers=rich_user["headers"])
    assert resp.status_code == 200 and resp.get_json()["status"] == "canceled"
    done = _finished(client, rich_user, batch["id"])
    counts = done["counts"]
    assert counts["canceled"] > 0 and counts["queued"] == counts["processing"] == 0
    assert counts["canceled"] + counts["succeeded"] + counts["failed"] == size

    from api.services import services

    with stack.app.app_context(), services().sessions() as session:
        jobs = session.scalars(select(Job).where(Job.batch_id == batch["id"])).all()
        seen = ledger_lines.per_job(session, jobs[0].user_id)  # the batch's row, per line
        for job in jobs:
            reasons = sorted(reason for reason, _run in seen[job.id])
            expected = ["charge", "refund"] if job.status in {"canceled", "failed"} else ["charge"]
            assert reasons == expected, (job.status, reasons)
    tokens, total = _balance(stack, rich_user["username"])
    assert tokens == total == size - counts["succeeded"]
    again = client.post(f"/v1/batches/{batch['id']}/cancel", headers=rich_user["headers"])
    assert again.status_code == 409


def test_batches_are_private_and_listed(stack, rich_user, photo_server):
    client = stack.client()
    batch = client.post(
        "/v1/batches",
        json={"urls": [photo_server.url("eagle.jpg")], "top_k": 2},
        headers=rich_user["headers"],
    ).get_json()
    other = support.new_user(client)
    assert client.get(f"/v1/batches/{batch['id']}", headers=other["headers"]).status_code == 404
    assert (
        client.get(f"/v1/batches/{batch['id']}/results", headers=other["headers"]).status_code
        == 404
    )
    listed = client.get("/v1/batches?limit=1", headers=rich_user["headers"]).get_json()
    assert listed["items"][0]["id"] == batch["id"]
    _finished(client, rich_user, batch["id"])
    rows = _results(client, rich_user, batch["id"])
    assert len(rows[0]["predictions"]) == 2


@pytest.mark.parametrize("size", [3, 40])  # a Core INSERT below COPY_MIN_ROWS, COPY above
def test_queued_batch_jobs_have_sql_null_results(api_stack, size):
    from sqlalchemy import func

    from shared.db import make_engine, make_session_factory

    client = api_stack.client()
    user = support.new_user(client)
    sessions = make_session_factory(make_engine(api_stack.config))
    with sessions() as session:
        user_id = session.scalars(select(User.id).where(User.username == user["username"])).one()
        ledger.grant(session, user_id, size, ledger.REFILL)
        session.commit()
    urls = [f"https://example.com/{i}.jpg" for i in range(size)]
    resp = client.post("/v1/batches", json={"urls": urls}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    with sessions() as session:
        nulls = session.scalar(
            select(func.count()).where(
                Job.batch_id == resp.get_json()["id"],
                Job.result.is_(None),
                Job.webhook_events.is_(None),
            )
        )
    assert nulls == size  # SQL NULL, not a JSON 'null', whichever way the rows went in


def test_a_running_batch_is_canceled_before_it_is_deleted(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    h = user["headers"]
    urls = [f"https://example.com/{i}.jpg" for i in range(3)]
    batch = client.post("/v1/batches", json={"urls": urls}, headers=h).get_json()
    refused = client.delete(f"/v1/batches/{batch['id']}", headers=h)
    assert refused.status_code == 409
    error = refused.get_json()["error"]
    assert error["code"] == "batch_running" and "/cancel" in error["message"]
    other = support.new_user(client)
    assert client.delete(f"/v1/batches/{batch['id']}", headers=other["headers"]).status_code == 404
    # No worker here: every job was still queued, so the cancel ends the batch.
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=h).status_code == 200
    assert client.delete(f"/v1/batches/{batch['id']}", headers=h).status_code == 204
    assert client.get(f"/v1/batches/{batch['id']}", headers=h).status_code == 404
    assert client.get("/v1/jobs", headers=h).get_json()["items"] == []


def test_a_finished_batch_is_deleted_with_its_jobs_and_the_ledger_stays(
    stack, rich_user, photo_server
):
    client = stack.client()
    urls = [photo_server.url("dog.jpg") + f"?d{i}" for i in range(3)]
    batch = client.post("/v1/batches", json={"urls": urls}, headers=rich_user["headers"]).get_json()
    _finished(client, rich_user, batch["id"])
    listed = client.get("/v1/jobs", headers=rich_user["headers"]).get_json()["items"]
    job_ids = [j["id"] for j in listed if j["batch_id"] == batch["id"]]
    assert len(job_ids) == 3
    before = _balance(stack, rich_user["username"])
    resp = client.delete(f"/v1/batches/{batch['id']}", headers=rich_user["headers"])
    assert resp.status_code == 204
    assert client.get(f"/v1/batches/{batch['id']}", headers=rich_user["headers"]).status_code == 404
    results = client.get(f"/v1/batches/{batch['id']}/results", headers=rich_user["headers"])
    assert results.status_code == 404

    from api.services import services

    with stack.app.app_context(), services().sessions() as session:
        assert not session.scalars(select(Job).where(Job.batch_id == batch["id"])).all()
        charged = session.execute(
            select(LedgerEntry.batch_id, LedgerEntry.job_id, LedgerEntry.delta).where(
                LedgerEntry.batch_id == batch["id"], LedgerEntry.reason == "charge"
            )
        ).all()
    # The charge keeps the id of the batch now gone, and what it cost.
    assert [tuple(r) for r in charged] == [(batch["id"], None, -3)]
    assert _balance(stack, rich_user["username"]) == before


def _sessions(config):
    from shared.db import make_engine, make_session_factory

    return make_session_factory(make_engine(config))


def _user_id(sessions, username: str) -> int:
    with sessions() as session:
        return session.scalars(select(User.id).where(User.username == username)).one()


def test_a_cancel_withdraws_the_unsent_lines_and_leaves_no_row_for_them(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    sessions = _sessions(api_stack.config)
    user_id = _user_id(sessions, user["username"])
    from api.services import services
    from shared import dispatch

    with api_stack.app.app_context():  # twice the bulk window: some lines wait in SQL
        size = 2 * dispatch.window(services().redis, api_stack.config) + 40
    with sessions() as session:
        ledger.grant(session, user_id, size - 5, ledger.REFILL)
        session.commit()
    urls = [f"https://example.com/{i}.jpg" for i in range(size)]  # COPY on PostgreSQL
    batch = client.post("/v1/batches", json={"urls": urls}, headers=user["headers"]).get_json()
    with sessions() as session:
        sent = set(
            session.scalars(
                select(Job.id).where(Job.batch_id == batch["id"], Job.dispatched_at.is_not(None))
            )
        )
    assert 0 < len(sent) < size  # no worker: the bulk window sent a few chunks, no more

    resp = client.post(f"/v1/batches/{batch['id']}/cancel", headers=user["headers"])
    assert resp.status_code == 200
    done = resp.get_json()
    assert done["status"] == "canceled" and done["total"] == size
    assert done["counts"]["canceled"] == size and sum(done["counts"].values()) == size
    got = client.get(f"/v1/batches/{batch['id']}", headers=user["headers"]).get_json()
    assert got["counts"] == done["counts"]
    with sessions() as session:
        left = set(session.scalars(select(Job.id).where(Job.batch_id == batch["id"])))
        seen = ledger_lines.per_job(session, user_id)
        charge = session.execute(
            select(LedgerEntry.delta).where(LedgerEntry.batch_id == batch["id"])
        ).scalar_one()
    # The lines sent stay, canceled, charged and refunded; the others left nothing behind:
    # the batch's charge row now covers only the lines sent.
    assert left == sent
    assert seen == {j: [("charge", 0), ("refund", 0)] for j in sent}
    assert charge == -len(sent)
    assert _balance(api_stack, user["username"]) == (size, size)
    results = _results(client, user, batch["id"])  # the lines left, and no error line
    assert len(results) == len(sent) and all(r["status"] == "canceled" for r in results)


def test_a_cancel_that_deadlocks_is_run_again_not_a_503(api_stack):
    """PostgreSQL: a cancel holding the batch waits for the user row, which a transaction
    that then asks for the batch holds (as a worker refunding a line and completing the
    batch does); PostgreSQL aborts the cancel, which runs again once the other is done."""
    if not api_stack.config.database_url.startswith("postgresql"):
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): it never deadlocks")
    import threading

    from sqlalchemy import text

    client = api_stack.client()
    user = support.new_user(client)
    sessions = _sessions(api_stack.config)
    user_id = _user_id(sessions, user["username"])
    urls = [f"https://example.com/{i}.jpg" for i in range(3)]
    batch = client.post("/v1/batches", json={"urls": urls}, headers=user["headers"]).get_json()
    answer = {}

    def cancel():
        resp = api_stack.app.test_client().post(
            f"/v1/batches/{batch['id']}/cancel", headers=user["headers"]
        )
        answer["cancel"] = (resp.status_code, resp.get_json())

    with sessions() as other, sessions() as watcher:
        # Only the cancel may detect the deadlock (1 s, the server's default), so that
        # this side is never the one aborted.
        other.execute(text("SET LOCAL deadlock_timeout = '60s'"))
        other.execute(text("UPDATE users SET tokens = tokens WHERE id = :u"), {"u": user_id})
        thread = threading.Thread(target=cancel)
        thread.start()

        def cancel_waits():
            watcher.rollback()
            return watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE 'UPDATE users%'"
                )
            )

        support.wait_for(cancel_waits, 30, "the cancel to wait for the user row", interval=0.05)
        other.execute(text("SELECT id FROM batches WHERE id = :b FOR UPDATE"), {"b": batch["id"]})
        other.rollback()  # the cancel's second run goes on
        thread.join(60)
    status, body = answer["cancel"]
    assert status == 200 and body["status"] == "canceled", body
    assert _balance(api_stack, user["username"]) == (5, 5)
