"""Hostile input gets a clean 4xx and costs nothing (issue #14, item 8)."""

from __future__ import annotations

import tracemalloc
import uuid

import pytest
from sqlalchemy import select

from api import create_app
from api.services import services
from shared.models import User
from tests import support

URL = "http://images.example.com/cat.jpg"


def _balance(app, username: str) -> tuple[int, int]:
    with app.app_context(), services().sessions() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        return user.tokens, support.ledger_sum(session, user.id)


@pytest.mark.parametrize(
    "bad",
    [
        "http://images.example.com/\x1b[31mred.jpg",
        "http://images.example.com/a\x00b.jpg",
        "http://images.example.com/a\x7f.jpg",
        "http://images.example.com/a\x9b31m.jpg",
        "http://images.example.com/\u202egpj.exe",
        "http://images.example.com/zero\u200bwidth.jpg",
    ],
)
def test_control_characters_in_urls_and_webhooks_are_refused(client, user, api_stack, bad):
    h = user["headers"]
    resp = client.post("/v1/jobs", json={"url": bad}, headers=h)
    assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "invalid_url"
    resp = client.post("/v1/jobs", json={"url": URL, "webhook": bad}, headers=h)
    assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "invalid_webhook"
    resp = client.post("/v1/batches", json={"urls": [URL, bad]}, headers=h)
    assert resp.status_code == 422 and resp.get_json()["error"]["details"]["lines"] == [2]
    resp = client.post("/v1/batches", json={"urls": [URL], "webhook": bad}, headers=h)
    assert resp.status_code == 422
    assert _balance(api_stack.app, user["username"]) == (5, 5)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/users", "/v1/batches", "/register"])
def test_deeply_nested_json_is_400_not_500(client, user, path):
    for depth in (100_000, 100):  # past the recursion limit, and merely absurd
        body = '{"url": ' + "[" * depth + "]" * depth + "}"
        resp = client.post(
            path, data=body, content_type="application/json", headers=user["headers"]
        )
        assert resp.status_code == 400, (depth, resp.get_json())
        assert resp.get_json()["error"]["code"] == "invalid_json"


def test_a_huge_text_batch_stops_parsing_past_the_limit(api_stack):
    app = create_app(api_stack.config.replace(max_batch_urls=10))
    client = app.test_client()
    user = support.new_user(client)
    body = b"http://images.example.com/a.jpg\n" * 1_000_000  # 32 MB, a million lines
    app.config["MAX_CONTENT_LENGTH"] = len(body) + 1
    tracemalloc.start()
    try:
        resp = client.post(
            "/v1/batches", data=body, content_type="text/plain", headers=user["headers"]
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "too_many_urls"
    # Splitting the whole body held ~100 MB of line strings; reading 11 lines holds little.
    assert peak < 16 * 1024 * 1024, peak
    assert _balance(app, user["username"]) == (5, 5)


@pytest.mark.parametrize("amount", [2.5, 2.0, True, "3", None])
def test_refill_amounts_must_be_json_integers(client, user, admin, api_stack, amount):
    body = {"username": user["username"], "amount": amount}
    resp = client.post("/v1/admin/refill", json=body, headers=admin["headers"])
    assert resp.status_code == 422, resp.get_json()
    assert _balance(api_stack.app, user["username"]) == (5, 5)


def test_metrics_labels_stay_bounded_whatever_methods_clients_send(client):
    tag = uuid.uuid4().hex[:8].upper()
    for i in range(50):
        client.open("/v1/me", method=f"X{tag}{i}")
        client.open("/nowhere", method=f"Y{tag}{i}")
    text = client.get("/metrics").get_data(as_text=True)
    assert tag not in text
    assert 'method="other"' in text
