"""Errors that say what to do: each message's key facts, on the real API, database and Redis."""

import base64

import pytest

from api import create_app
from tests import support

URL = "http://images.example.com/dog.jpg"


def test_a_short_balance_gives_the_balance_the_cost_and_who_refills(client, user):
    for _ in range(4):
        client.post("/v1/jobs", json={"url": URL}, headers=user["headers"])
    resp = client.post(
        "/v1/batches", json={"urls": [URL, URL + "?2", URL + "?3"]}, headers=user["headers"]
    )
    assert resp.status_code == 402
    error = resp.get_json()["error"]
    assert error["details"] == {"balance": 1, "cost": 3}
    assert "balance is 1" in error["message"] and "administrator" in error["message"]
    assert "refill your balance" not in error["message"]


def test_a_known_model_that_is_not_enabled_says_so_and_names_models(client, user):
    resp = client.post(
        "/v1/jobs", json={"url": URL, "model": "inception_v3"}, headers=user["headers"]
    )
    assert resp.status_code == 422
    error = resp.get_json()["error"]
    assert error["code"] == "model_not_enabled"
    assert "not enabled" in error["message"] and "MODELS" in error["message"]
    assert "Unknown" not in error["message"]
    unknown = client.post("/v1/jobs", json={"url": URL, "model": "vgg99"}, headers=user["headers"])
    assert unknown.get_json()["error"]["code"] == "unknown_model"


@pytest.mark.parametrize(
    ("content_type", "body", "sent"),
    [
        ("application/x-www-form-urlencoded", "url=x", "application/x-www-form-urlencoded"),
        (None, "url=x", "no Content-Type"),
        ("application/json", "[1]", "not a JSON object"),
    ],
)
def test_a_body_of_the_wrong_type_names_the_content_type(client, user, content_type, body, sent):
    headers = {**user["headers"], **({"Content-Type": content_type} if content_type else {})}
    for path in ("/v1/jobs", "/v1/batches"):
        resp = client.post(path, data=body, headers=headers)
        assert resp.status_code == 422
        error = resp.get_json()["error"]
        assert error["code"] == "invalid_body"
        assert sent in error["message"] and "Content-Type: application/json" in error["message"]


def test_the_generic_validation_message_is_one_sentence(client, user):
    # One is found by our marshmallow load, the other by webargs in flask-smorest.
    body = client.post("/v1/jobs", json={"url": URL, "top_k": 99}, headers=user["headers"])
    query = client.get("/v1/jobs?limit=0", headers=user["headers"])
    assert body.status_code == query.status_code == 422
    messages = {r.get_json()["error"]["message"] for r in (body, query)}
    assert len(messages) == 1
    assert all(r.get_json()["error"]["details"]["fields"] for r in (body, query))


def test_unknown_paths_and_methods_answer_json(client):
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.is_json
    assert missing.get_json()["error"]["code"] == "not_found"
    assert "/v1/nothing-here" in missing.get_json()["error"]["message"]
    wrong = client.delete("/v1/jobs")
    assert wrong.status_code == 405 and wrong.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in wrong.get_json()["error"]["message"]


def test_every_401_carries_www_authenticate(client, user):
    wrong_password = {
        "Authorization": "Basic " + base64.b64encode(f"{user['username']}:nope!!".encode()).decode()
    }
    for headers in ({}, support.bearer("ick_revoked"), wrong_password):
        resp = client.get("/v1/me", headers=headers)
        assert resp.status_code == 401
        assert "Basic" in resp.headers["WWW-Authenticate"], resp.get_json()


def test_a_web_page_call_is_not_offered_basic_auth(api_stack):
    """A Basic challenge would make the browser show its own login box over the page."""
    client = api_stack.client()
    client.set_cookie("session", "expired-or-forged")
    resp = client.get("/v1/me")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="imgclf"'


def test_accepted_jobs_and_batches_carry_location(client, user):
    job = client.post("/v1/jobs", json={"url": URL}, headers=user["headers"])
    assert job.status_code == 202
    assert job.headers["Location"] == f"/v1/jobs/{job.get_json()['id']}"
    batch = client.post("/v1/batches", json={"urls": [URL]}, headers=user["headers"])
    assert batch.status_code == 202
    assert batch.headers["Location"] == f"/v1/batches/{batch.get_json()['id']}"


def test_a_trained_model_that_is_not_enabled_says_so(api_stack, tmp_path):
    # Trained models' names may hold '-' and '.' (cifar10-cnn): the check follows the
    # training pipeline's own rule, not Python's identifiers.
    (tmp_path / "cifar10-cnn").mkdir()
    (tmp_path / "cifar10-cnn" / "model.keras").write_bytes(b"")
    client = create_app(api_stack.config.replace(model_dir=str(tmp_path))).test_client()
    user = support.new_user(client)
    for name, code in (("cifar10-cnn", "model_not_enabled"), ("../cifar10-cnn", "unknown_model")):
        resp = client.post("/v1/jobs", json={"url": URL, "model": name}, headers=user["headers"])
        assert resp.get_json()["error"]["code"] == code, name
