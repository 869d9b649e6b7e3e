"""JSON Lines batches: per-line custom ids and top_k, echoed in results and jobs."""

import json

from sqlalchemy import select

from shared.models import Job
from tests import support
from tests.api.test_batches import _balance, _finished, _results, rich_user  # noqa: F401


def _jsonl(items) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def test_custom_ids_are_echoed_in_results_and_jobs(stack, rich_user, photo_server):  # noqa: F811
    client = stack.client()
    items = [
        {"custom_id": "sku-1", "url": photo_server.url("parrot.jpg")},
        {"custom_id": "sku 2 / ünïcode", "url": photo_server.url("hot_dog.jpg"), "top_k": 1},
        {"url": photo_server.url("eagle.jpg")},  # custom_id is optional
    ]
    resp = client.post(
        "/v1/batches?top_k=3",
        data="\n" + _jsonl(items),  # blank lines are skipped, as in text/plain
        content_type="application/jsonl",
        headers=rich_user["headers"],
    )
    assert resp.status_code == 202, resp.get_json()
    batch = _finished(client, rich_user, resp.get_json()["id"])
    assert batch["counts"]["succeeded"] == 3

    rows = _results(client, rich_user, batch["id"])
    assert [r["custom_id"] for r in rows] == ["sku-1", "sku 2 / ünïcode", None]
    assert [len(r["predictions"]) for r in rows] == [3, 1, 3]  # the line's top_k wins
    assert rows[0]["predictions"][0]["label"] == "macaw"
    table = _results(client, rich_user, batch["id"], "csv")
    assert [r["custom_id"] for r in table] == ["sku-1", "sku 2 / ünïcode", ""]
    assert table[1]["top_label"] == "hotdog"

    from api.services import services

    with stack.app.app_context(), services().sessions() as session:
        job_id = session.scalars(
            select(Job.id).where(Job.batch_id == batch["id"], Job.custom_id == "sku-1")
        ).one()
    job = client.get(f"/v1/jobs/{job_id}", headers=rich_user["headers"]).get_json()
    assert job["custom_id"] == "sku-1" and job["batch_id"] == batch["id"]


def test_ndjson_and_json_items_are_the_same_input(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    items = [{"custom_id": "a", "url": "https://example.com/a.jpg"}]
    resp = client.post(
        "/v1/batches",
        data=_jsonl(items),
        content_type="application/x-ndjson",
        headers=user["headers"],
    )
    assert resp.status_code == 202, resp.get_json()
    resp = client.post("/v1/batches", json={"items": items, "top_k": 2}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["top_k"] == 2


def test_invalid_lines_are_refused_with_their_numbers(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    url = "https://example.com/x.jpg"
    body = "\n".join(
        [
            json.dumps({"custom_id": "a", "url": url}),  # 1: fine
            "{not json",  # 2
            json.dumps({"custom_id": "b"}),  # 3: no url
            json.dumps({"custom_id": "c", "url": "ftp://x/y.jpg"}),  # 4: bad url
            json.dumps({"custom_id": "a", "url": url}),  # 5: repeats line 1's id
            json.dumps({"custom_id": "x" * 65, "url": url}),  # 6: too long
            json.dumps({"custom_id": "tab\there", "url": url}),  # 7: not printable
            json.dumps({"custom_id": 7, "url": url}),  # 8: not a string
            json.dumps({"url": url, "top_k": 0}),  # 9: top_k out of range
            json.dumps({"url": url, "top_k": 2.5}),  # 10: not an integer
            json.dumps({"url": url, "custom-id": "typo"}),  # 11: unknown field
            json.dumps([url]),  # 12: not an object
            json.dumps({"custom_id": "d", "url": url, "top_k": 20}),  # 13: fine
        ]
    )
    resp = client.post(
        "/v1/batches", data=body, content_type="application/jsonl", headers=user["headers"]
    )
    assert resp.status_code == 422, resp.get_json()
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_lines"
    assert error["details"]["lines"] == list(range(2, 13))
    assert "repeats line 1" in error["details"]["problems"][3]["problem"]
    assert "line 2:" in error["message"]
    resp = client.post(
        "/v1/batches", json={"items": [{"url": url}, {"url": 3}]}, headers=user["headers"]
    )
    assert resp.status_code == 422 and resp.get_json()["error"]["details"]["lines"] == [2]
    resp = client.post("/v1/batches", json={"urls": [url], "items": []}, headers=user["headers"])
    assert resp.status_code == 422
    resp = client.post(
        "/v1/batches", data="\n\n", content_type="application/jsonl", headers=user["headers"]
    )
    assert resp.get_json()["error"]["code"] == "empty_batch"
    assert client.get("/v1/batches", headers=user["headers"]).get_json()["items"] == []
    assert _balance(api_stack, user["username"]) == (5, 5)


def test_a_jsonl_body_stops_reading_past_the_limit(api_stack):
    client = api_stack.client()
    user = support.new_user(client)
    limit = api_stack.config.max_batch_urls
    line = json.dumps({"url": "https://example.com/x.jpg"}) + "\n"
    resp = client.post(
        "/v1/batches",
        data=line * (limit + 5),
        content_type="application/jsonl",
        headers=user["headers"],
    )
    assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "too_many_urls"
