"""Job and batch ids that no row can have get the same 404 on PostgreSQL (a uuid column,
which refuses to compare with text that is no uuid) as on SQLite (text): every route
that takes one, the web pages, and the list cursors that carry one."""

from __future__ import annotations

import base64
import re

import pytest

from shared.models import new_id

URL = "http://images.example.com/dog.jpg"
JOB_ROUTES = [
    ("GET", "/v1/jobs/{}"),
    ("POST", "/v1/jobs/{}/cancel"),
    ("DELETE", "/v1/jobs/{}"),
    ("GET", "/v1/jobs/{}/deliveries"),
]
BATCH_ROUTES = [
    ("GET", "/v1/batches/{}"),
    ("GET", "/v1/batches/{}/results"),
    ("POST", "/v1/batches/{}/cancel"),
    ("POST", "/v1/batches/{}/retry"),
    ("DELETE", "/v1/batches/{}"),
    ("GET", "/v1/batches/{}/deliveries"),
]


def malformed(real_id: str) -> list[str]:
    """Ids that name no row: not a uuid at all, and forms of the caller's own id that
    PostgreSQL's uuid input would accept (and find) but the stored text never matches."""
    return [
        "not-a-uuid",
        "x" * 36,
        real_id[:-1] + "g",
        real_id.upper(),
        real_id.replace("-", ""),
        "{" + real_id + "}",
        real_id + "0",
    ]


@pytest.fixture
def owned(client, user) -> dict[str, str]:
    """A job and a batch of the caller's."""
    job = client.post("/v1/jobs", json={"url": URL}, headers=user["headers"])
    batch = client.post("/v1/batches", json={"urls": [URL]}, headers=user["headers"])
    assert job.status_code == 202 and batch.status_code == 202
    return {"job": job.get_json()["id"], "batch": batch.get_json()["id"]}


@pytest.mark.parametrize(
    ("method", "route", "noun"),
    [(m, r, "job") for m, r in JOB_ROUTES] + [(m, r, "batch") for m, r in BATCH_ROUTES],
)
def test_a_malformed_id_is_not_found(client, user, owned, method, route, noun):
    for row_id in malformed(owned[noun]):
        resp = client.open(route.format(row_id), method=method, headers=user["headers"])
        assert resp.status_code == 404, (row_id, resp.get_json())
        assert resp.get_json()["error"]["code"] == f"{noun}_not_found", row_id
    # Nothing else changed: the real rows are still there, as they were.
    assert client.get(f"/v1/jobs/{owned['job']}", headers=user["headers"]).status_code == 200
    batch = client.get(f"/v1/batches/{owned['batch']}", headers=user["headers"]).get_json()
    assert batch["status"] != "canceled"


def test_a_malformed_id_still_needs_a_caller_first(client):
    resp = client.get("/v1/jobs/not-a-uuid")
    assert resp.status_code == 401


CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def test_the_pages_of_a_malformed_id_are_not_found(client, user, owned):
    token = CSRF.search(client.get("/app/login").get_data(as_text=True)).group(1)
    login = {"username": user["username"], "password": user["password"], "csrf_token": token}
    assert client.post("/app/login", data=login).status_code == 302
    for noun, page in (("job", "/app/jobs/{}"), ("batch", "/app/batches/{}")):
        for row_id in malformed(owned[noun]):
            assert client.get(page.format(row_id)).status_code == 404, row_id
        assert client.get(page.format(owned[noun])).status_code == 200


def _cursor(created_at: str, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at}|{row_id}".encode()).decode().rstrip("=")


@pytest.mark.parametrize("listing", ["/v1/jobs", "/v1/batches"])
def test_a_cursor_with_a_malformed_id_is_refused(client, user, owned, listing):
    good = _cursor("2026-12-06T12:00:00+00:00", new_id())
    assert client.get(f"{listing}?cursor={good}", headers=user["headers"]).status_code == 200
    for row_id in malformed(owned["job"]):
        cursor = _cursor("2026-12-06T12:00:00+00:00", row_id)
        resp = client.get(f"{listing}?cursor={cursor}", headers=user["headers"])
        assert resp.status_code == 422, (row_id, resp.get_json())
        assert resp.get_json()["error"]["code"] == "invalid_cursor"
