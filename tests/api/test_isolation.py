"""Nobody reaches another user's things, and secrets never leak into logs, errors or SQL."""

import logging
import uuid

from sqlalchemy import text

from api.services import services
from tests import support

URL = "http://images.example.com/a.jpg"


def test_every_endpoint_with_an_id_hides_other_users_things(client, api_stack):
    owner, intruder = support.new_user(client), support.new_user(client)
    job = client.post("/v1/jobs", json={"url": URL}, headers=owner["headers"]).get_json()
    batch = client.post("/v1/batches", json={"urls": [URL]}, headers=owner["headers"]).get_json()
    key = client.get("/v1/keys", headers=owner["headers"]).get_json()["items"][0]
    attempts = [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}?wait=1"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/deliveries"),
        ("GET", f"/v1/batches/{batch['id']}"),
        ("GET", f"/v1/batches/{batch['id']}/results"),
        ("GET", f"/v1/batches/{batch['id']}/results?format=csv"),
        ("POST", f"/v1/batches/{batch['id']}/cancel"),
        ("GET", f"/v1/batches/{batch['id']}/deliveries"),
        ("DELETE", f"/v1/keys/{key['id']}"),
    ]
    for method, path in attempts:
        resp = client.open(path, method=method, headers=intruder["headers"])
        assert resp.status_code == 404, (method, path, resp.status_code)
        assert job["id"] not in resp.get_data(as_text=True)
    listed = client.get("/v1/jobs", headers=intruder["headers"]).get_json()["items"]
    assert listed == []
    assert client.get("/v1/batches", headers=intruder["headers"]).get_json()["items"] == []
    # And the owner's things are untouched.
    assert (
        client.get(f"/v1/jobs/{job['id']}", headers=owner["headers"]).get_json()["status"]
        == "queued"
    )
    assert client.get("/v1/me", headers=support.bearer(owner["key"])).status_code == 200


def test_passwords_and_keys_never_appear_in_logs_errors_or_the_database(client, api_stack, caplog):
    password = "Sup3r-Secret-Passw0rd"
    caplog.set_level(logging.DEBUG)
    resp = client.post(
        "/v1/users",
        json={"username": "leakcheck-" + uuid.uuid4().hex[:6], "password": password},
    )
    body = resp.get_json()
    key = body["api_key"]
    username = body["username"]
    bad = client.get("/v1/me", headers=support.basic_auth(username, password + "x"))
    short = client.post("/v1/users", json={"username": "leak2", "password": "123"})
    wrong_key = client.get("/v1/me", headers=support.bearer(key + "x"))
    for resp in (bad, short, wrong_key):
        assert password not in resp.get_data(as_text=True)
        assert key not in resp.get_data(as_text=True)
    assert password not in caplog.text and key not in caplog.text
    with api_stack.app.app_context(), services().engine.connect() as conn:
        for table in ("users", "api_keys", "token_ledger", "jobs", "idempotency_keys"):
            dump = " ".join(str(row) for row in conn.execute(text(f"SELECT * FROM {table}")))
            assert password not in dump and key not in dump, table
