"""Edge errors on the bulk surface (issue #23 item 4): races, odd bodies, odd bytes."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from sqlalchemy import func, select

from api.services import services
from shared import ledger
from shared.models import Batch, Job, User
from tests import support
from tests.api.test_batch_retry import _failed_batch
from tests.api.test_batches import _balance

URL = "https://example.com/x.jpg"


def _grant(app, username: str, amount: int) -> None:
    with app.app_context(), services().sessions() as session:
        user_id = session.scalars(select(User.id).where(User.username == username)).one()
        ledger.grant(session, user_id, amount, ledger.REFILL)
        session.commit()


def _count(app, *where) -> int:
    with app.app_context(), services().sessions() as session:
        return session.scalar(select(func.count()).select_from(where[0]).where(*where[1:]))


# With tokens for all eight, the twins hit the key's unique constraint (500s before);
# with tokens for one, the first charge left too few for the others (402s before).
@pytest.mark.parametrize("extra_tokens", [100, 0])
def test_the_same_idempotency_key_sent_eight_times_at_once_makes_one_batch(api_stack, extra_tokens):
    """Eight clients, one key, the same body: one batch, one charge, one answer."""
    client = api_stack.client()
    user = support.new_user(client)
    username = user["username"]
    if extra_tokens:
        _grant(api_stack.app, username, extra_tokens)
    headers = {**user["headers"], "Idempotency-Key": uuid.uuid4().hex}
    urls = [f"{URL}?{i}" for i in range(3)]
    barrier = threading.Barrier(8)
    answers: list[tuple[int, dict]] = []

    def submit() -> None:
        own = api_stack.app.test_client()
        barrier.wait()
        resp = own.post("/v1/batches", json={"urls": urls}, headers=headers)
        answers.append((resp.status_code, resp.get_json()))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [status for status, _ in answers] == [202] * 8, answers
    assert len({json.dumps(body, sort_keys=True) for _, body in answers}) == 1
    assert _balance(api_stack, username) == (2 + extra_tokens,) * 2
    batch_id = answers[0][1]["id"]
    assert _count(api_stack.app, Job, Job.batch_id == batch_id) == 3
    with api_stack.app.app_context(), services().sessions() as session:
        owner = session.scalars(select(User.id).where(User.username == username)).one()
        assert session.scalar(select(func.count()).where(Batch.user_id == owner)) == 1


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", "error_codes=fetch_failed"),  # curl -d
        ("application/json", "[1]"),
        ("text/plain", "fetch_failed"),
    ],
)
def test_a_retry_body_that_is_not_a_json_object_is_invalid_body(api_stack, content_type, body):
    client = api_stack.client()
    user = support.new_user(client)
    batch = _failed_batch(api_stack.app, client, user, 2)
    resp = client.post(
        f"/v1/batches/{batch['id']}/retry",
        data=body,
        headers={**user["headers"], "Content-Type": content_type},
    )
    assert resp.status_code == 422, resp.get_json()
    assert resp.get_json()["error"]["code"] == "invalid_body"
    assert _balance(api_stack, user["username"]) == (5, 5)
    # No body at all still retries every failed line.
    resp = client.post(f"/v1/batches/{batch['id']}/retry", headers=user["headers"])
    assert resp.status_code == 202 and resp.get_json()["retried"] == 2


@pytest.mark.parametrize("content_type", ["application/jsonl", "application/x-ndjson"])
def test_a_json_lines_line_nested_too_deep_is_400_invalid_json(client, user, content_type):
    for depth in (100_000, 100):
        body = json.dumps({"url": URL}) + "\n" + "[" * depth + "]" * depth + "\n"
        resp = client.post(
            "/v1/batches", data=body, content_type=content_type, headers=user["headers"]
        )
        assert resp.status_code == 400, (depth, resp.get_json())
        error = resp.get_json()["error"]
        assert error["code"] == "invalid_json" and error["details"]["lines"] == [2]


@pytest.mark.parametrize(
    "path", ["/v1/batches/{id}/retry", "/v1/keys", "/v1/admin/refill", "/token"]
)
def test_deeply_nested_json_is_400_on_every_json_endpoint(api_stack, path):
    client = api_stack.client()
    user = support.new_user(client)
    batch = _failed_batch(api_stack.app, client, user, 1)
    body = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    resp = client.post(
        path.format(id=batch["id"]),
        data=body,
        content_type="application/json",
        headers=user["headers"],
    )
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["code"] == "invalid_json"


def test_invalid_utf8_in_json_lines_is_refused_naming_the_lines(api_stack):
    """Two different bad byte sequences once became one U+FFFD id, a false duplicate."""
    client = api_stack.client()
    user = support.new_user(client)
    body = b"\n".join(
        [
            json.dumps({"custom_id": "ok", "url": URL}).encode(),
            b'{"custom_id": "a\xff", "url": "https://example.com/1.jpg"}',
            b'{"custom_id": "a\xfe", "url": "https://example.com/2.jpg"}',
        ]
    )
    resp = client.post(
        "/v1/batches", data=body, content_type="application/jsonl", headers=user["headers"]
    )
    assert resp.status_code == 422, resp.get_json()
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_encoding"
    assert error["details"]["lines"] == [2, 3] and "UTF-8" in error["message"]
    assert _balance(api_stack, user["username"]) == (5, 5)


def test_invalid_utf8_in_a_text_batch_is_refused_naming_the_lines(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    body = b"https://example.com/a.jpg\nhttps://example.com/\xc3(.jpg\n"
    resp = client.post("/v1/batches", data=body, content_type="text/plain", headers=user["headers"])
    assert resp.status_code == 422, resp.get_json()
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_encoding" and error["details"]["lines"] == [2]
    assert _balance(api_stack, user["username"]) == (5, 5)


def _ended_batch(app, client, user, size: int) -> str:
    _grant(app, user["username"], size)
    urls = [f"{URL}?{i}" for i in range(size)]
    resp = client.post("/v1/batches", json={"urls": urls}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    batch_id = resp.get_json()["id"]
    # No worker here: every job is still queued, so the cancel ends the batch.
    assert client.post(f"/v1/batches/{batch_id}/cancel", headers=user["headers"]).status_code == 200
    return batch_id


def test_a_batch_deleted_while_its_results_stream_ends_with_an_error_line(api_stack):
    from api.bulk import RESULTS_PAGE

    client = api_stack.client()
    user = support.new_user(client)
    size = RESULTS_PAGE * 2 + 10
    batch_id = _ended_batch(api_stack.app, client, user, size)
    resp = client.get(f"/v1/batches/{batch_id}/results", headers=user["headers"], buffered=False)
    assert resp.status_code == 200
    chunks = iter(resp.response)
    first = next(chunks)  # the first page has been read
    deleted = api_stack.app.test_client().delete(f"/v1/batches/{batch_id}", headers=user["headers"])
    assert deleted.status_code == 204
    text = (first + b"".join(chunks)).decode()
    resp.close()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) < size + 1
    assert [line["index"] for line in lines[:-1]] == list(range(len(lines) - 1))
    error = lines[-1]["error"]
    assert error["code"] == "batch_deleted" and "index" not in lines[-1]
    assert error["details"] == {"sent": len(lines) - 1, "total": size}


def test_a_batch_deleted_while_its_csv_streams_cuts_the_transfer(api_stack):
    from api.bulk import RESULTS_PAGE, BatchDeleted

    client = api_stack.client()
    user = support.new_user(client)
    batch_id = _ended_batch(api_stack.app, client, user, RESULTS_PAGE + 1)
    resp = client.get(
        f"/v1/batches/{batch_id}/results?format=csv", headers=user["headers"], buffered=False
    )
    chunks = iter(resp.response)
    next(chunks)  # the header row
    next(chunks)  # the first page has been read
    api_stack.app.test_client().delete(f"/v1/batches/{batch_id}", headers=user["headers"])
    with pytest.raises(BatchDeleted):
        for _ in chunks:
            pass
    resp.close()


def test_a_complete_results_stream_has_no_error_line(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    batch_id = _ended_batch(api_stack.app, client, user, 3)
    resp = client.get(f"/v1/batches/{batch_id}/results", headers=user["headers"])
    lines = [json.loads(line) for line in resp.get_data(as_text=True).splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]


def test_a_retry_of_an_unknown_error_code_lists_the_known_ones(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    batch = _failed_batch(api_stack.app, client, user, 1)
    url = f"/v1/batches/{batch['id']}/retry"
    for codes, meant in ((["bogus"], None), (["fetch_faild"], "fetch_failed")):
        resp = client.post(url, json={"error_codes": codes}, headers=user["headers"])
        assert resp.status_code == 422, resp.get_json()
        error = resp.get_json()["error"]
        assert error["code"] == "unknown_error_code"
        assert error["details"]["unknown"] == codes
        assert {"fetch_failed", "not_an_image", "worker_lost"} <= set(error["details"]["known"])
        assert "fetch_failed" in error["message"]
        if meant:
            assert f"Did you mean '{meant}'" in error["message"]
    assert _balance(api_stack, user["username"]) == (5, 5)
