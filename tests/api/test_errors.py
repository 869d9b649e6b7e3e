"""Errors that say what to do: each message's key facts, on the real API, database and Redis."""

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys

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
    assert set(wrong.headers["Allow"].split(", ")) >= {"GET", "POST"}  # RFC 9110


def test_malformed_chunked_json_is_400_like_any_malformed_json(client, user):
    """A chunked body has no Content-Length; it is JSON all the same."""
    for path in ("/v1/jobs", "/v1/batches", "/v1/keys"):
        resp = client.post(
            path,
            input_stream=io.BytesIO(b'{"url": "http://images.example.com/a.jpg",'),
            headers={
                **user["headers"],
                "Content-Type": "application/json",
                "Transfer-Encoding": "chunked",
            },
            environ_overrides={"wsgi.input_terminated": True},  # as gunicorn sets it
        )
        assert resp.status_code == 400, (path, resp.get_json())
        assert resp.get_json()["error"]["code"] == "invalid_json"


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_request(port: int, request: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def test_errors_gunicorn_answers_itself_are_json_too(tmp_path):
    """A request line over limit_request_line never reaches Flask: gunicorn answers it."""
    port = _free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "WEB_CONCURRENCY": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # Any WSGI app will do: these answers come before the app is called.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "wsgiref.simple_server:demo_app",
        ],
        cwd=support.ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def up():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return None

        support.wait_for(up, 60, "gunicorn to listen", interval=0.2)
        long_line = b"GET /v1/jobs?" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        many_headers = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n"
        for request, status, code in (
            (long_line, b"414", "uri_too_long"),
            (many_headers, b"431", "headers_too_large"),
        ):
            head, body = _raw_request(port, request)
            assert head.split(b" ")[1] == status, head
            assert b"Content-Type: application/json" in head
            assert json.loads(body)["error"]["code"] == code
    finally:
        proc.terminate()
        proc.wait(30)


JSONL = (
    '{"custom_id": "a", "url": "https://example.com/a.jpg"}\n{"url": "https://example.com/b.jpg"}\n'
)


@pytest.mark.parametrize(
    ("content_type", "status", "code"),
    [("text/plain", 422, "invalid_urls"), ("application/json", 400, "invalid_json")],
)
def test_json_lines_sent_with_another_type_are_told_the_type(
    client, user, content_type, status, code
):
    resp = client.post(
        "/v1/batches", data=JSONL, content_type=content_type, headers=user["headers"]
    )
    assert resp.status_code == status, resp.get_json()
    error = resp.get_json()["error"]
    assert error["code"] == code
    assert "Content-Type: application/jsonl" in error["message"]
    plain = client.post(
        "/v1/batches", data="not a url\n", content_type="text/plain", headers=user["headers"]
    )
    assert "application/jsonl" not in plain.get_json()["error"]["message"]


def test_an_unknown_field_names_the_field_meant(client, user):
    resp = client.post("/v1/jobs", json={"uri": URL}, headers=user["headers"])
    assert resp.status_code == 422
    error = resp.get_json()["error"]
    assert "'url'" in error["message"] and "'uri'" in error["message"]
    assert "'url'" in error["details"]["fields"]["uri"][0]
    line = json.dumps({"uri": URL}) + "\n"
    resp = client.post(
        "/v1/batches", data=line, content_type="application/jsonl", headers=user["headers"]
    )
    assert "did you mean 'url'" in resp.get_json()["error"]["details"]["problems"][0]["problem"]
