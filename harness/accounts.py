"""Users and administrators made the documented ways, and their auth headers."""

from __future__ import annotations

import base64
import uuid


def basic_auth(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_user(client) -> dict:
    """Sign up a fresh user through the API; returns credentials and ready auth headers."""
    username = f"u{uuid.uuid4().hex[:12]}"
    password = "correct-horse"
    resp = client.post("/v1/users", json={"username": username, "password": password})
    assert resp.status_code == 201, resp.get_json()
    key = resp.get_json()["api_key"]
    return {
        "username": username,
        "password": password,
        "key": key,
        "headers": bearer(key),
        "basic": basic_auth(username, password),
    }


def make_admin(app) -> dict:
    """An administrator made the documented way: ``flask --app api create-admin``."""
    username = f"admin{uuid.uuid4().hex[:8]}"
    result = app.test_cli_runner().invoke(
        args=["create-admin", username, "--password", "admin-secret"]
    )
    assert result.exit_code == 0, result.output
    key = result.output.strip().rsplit(" ", 1)[-1]
    return {"username": username, "password": "admin-secret", "headers": bearer(key)}
