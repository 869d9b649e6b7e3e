"""Accounts, API keys, admin refill: the real API on PostgreSQL and SQLite."""

import hashlib

from sqlalchemy import select

from api.services import services
from shared.models import ApiKey
from tests import support


def test_signup_grants_five_tokens_and_a_key_shown_once(client):
    resp = client.post("/v1/users", json={"username": "someone-new-1", "password": "secret-pw"})
    # Names are unique per database; the second backend run would collide, so vary it.
    if resp.status_code == 409:
        resp = client.post("/v1/users", json={"username": "someone-new-2", "password": "secret-pw"})
    assert resp.status_code == 201
    body = resp.get_json()
    assert body["tokens"] == 5 and body["api_key"].startswith("ick_")
    me = client.get("/v1/me", headers=support.bearer(body["api_key"])).get_json()
    assert me["tokens"] == 5 and me["is_admin"] is False


def test_api_keys_are_stored_only_as_hashes(client, user, api_stack):
    with api_stack.app.app_context(), services().sessions() as session:
        rows = session.scalars(select(ApiKey)).all()
    hashes = {r.key_hash for r in rows}
    assert hashlib.sha256(user["key"].encode()).hexdigest() in hashes
    assert all(user["key"] not in (r.key_hash, r.prefix) for r in rows)


def test_duplicate_username_is_409(client, user):
    resp = client.post("/v1/users", json={"username": user["username"], "password": "whatever1"})
    assert resp.status_code == 409
    assert resp.get_json()["error"]["code"] == "username_taken"


def test_bad_signup_input_is_422(client):
    for body in (
        {"username": "ab", "password": "secret-pw"},
        {"username": "good_name", "password": "123"},
        {"username": "bad name!", "password": "secret-pw"},
        {"password": "secret-pw"},
    ):
        resp = client.post("/v1/users", json=body)
        assert resp.status_code == 422, body
        assert "code" in resp.get_json()["error"]


def test_basic_auth_works_and_a_wrong_password_is_401(client, user):
    assert client.get("/v1/me", headers=user["basic"]).status_code == 200
    resp = client.get("/v1/me", headers=support.basic_auth(user["username"], "wrong-password"))
    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "invalid_credentials"
    assert client.get("/v1/me").status_code == 401
    assert client.get("/v1/me", headers=support.bearer("ick_nope")).status_code == 401


def test_keys_can_be_created_listed_and_revoked(client, user):
    created = client.post("/v1/keys", json={"name": "ci"}, headers=user["headers"])
    assert created.status_code == 201
    new = created.get_json()
    listed = client.get("/v1/keys", headers=user["headers"]).get_json()["items"]
    assert {k["prefix"] for k in listed} >= {new["prefix"]}
    assert all("key" not in k for k in listed)
    assert client.delete(f"/v1/keys/{new['id']}", headers=user["headers"]).status_code == 204
    assert client.get("/v1/me", headers=support.bearer(new["key"])).status_code == 401
    assert client.delete(f"/v1/keys/{new['id']}", headers=user["headers"]).status_code == 404


def test_a_user_cannot_revoke_another_users_key(client, user):
    other = support.new_user(client)
    keys = client.get("/v1/keys", headers=other["headers"]).get_json()["items"]
    resp = client.delete(f"/v1/keys/{keys[0]['id']}", headers=user["headers"])
    assert resp.status_code == 404
    assert client.get("/v1/me", headers=other["headers"]).status_code == 200


def test_refill_is_admin_only(client, user, admin):
    body = {"username": user["username"], "amount": 10}
    resp = client.post("/v1/admin/refill", json=body, headers=user["headers"])
    assert resp.status_code == 403
    assert resp.get_json()["error"]["code"] == "admin_required"
    resp = client.post("/v1/admin/refill", json=body, headers=admin["headers"])
    assert resp.status_code == 200 and resp.get_json()["tokens"] == 15
    resp = client.post(
        "/v1/admin/refill", json={"username": "nobody-here", "amount": 1}, headers=admin["headers"]
    )
    assert resp.status_code == 404
    resp = client.post(
        "/v1/admin/refill",
        json={"username": user["username"], "amount": -5},
        headers=admin["headers"],
    )
    assert resp.status_code == 422
