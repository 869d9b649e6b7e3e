"""Users and administrators made the documented ways, and their auth headers."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from shared import ledger
from shared.models import Job, LedgerEntry, User, new_id


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


def refill(client, app, username: str, amount: int) -> None:
    """Top a user up the documented way: an administrator's ``POST /v1/admin/refill``."""
    admin = make_admin(app)
    resp = client.post(
        "/v1/admin/refill",
        json={"username": username, "amount": amount},
        headers=admin["headers"],
    )
    assert resp.status_code == 200, resp.get_json()


def funded_user(client, app, tokens: int) -> dict:
    """``new_user`` (its signup tokens) plus ``tokens`` refilled by an administrator."""
    user = new_user(client)
    refill(client, app, user["username"], tokens)
    return user


def new_account(sessions: Callable[[], Any], tokens: int = 0, prefix: str = "u") -> int:
    """A user row made straight in the database, for tests below the API; returns its id.

    ``tokens`` are granted as at sign-up (a ledger entry, as the API does); ``prefix``
    starts the username, so a test can find its own users. Use ``new_user`` when the test
    goes through the API.
    """
    with sessions() as session:
        user = add_account(session, tokens, prefix)
        session.commit()
        return user.id


def add_account(session: Any, tokens: int = 0, prefix: str = "u") -> User:
    """``new_account`` inside a session of the caller's (flushed, not committed)."""
    user = User(username=f"{prefix}{new_id()[-12:]}", password_hash="x", tokens=0)
    session.add(user)
    session.flush()
    if tokens:
        ledger.grant(session, user.id, tokens, ledger.SIGNUP)
    return user


def ledger_sum(session: Any, user_id: int) -> int:
    """The balance as the user's ledger rows add up: ``users.tokens`` must always equal it
    (shared/ledger.py keeps both in one transaction), which is what tests check."""
    total = session.execute(
        select(func.coalesce(func.sum(LedgerEntry.delta), 0)).where(LedgerEntry.user_id == user_id)
    ).scalar_one()
    return int(total)


def charged_job(
    session: Any, user_id: int, input_url: str = "http://x/y.jpg", **fields: Any
) -> Job:
    """A single job of ``user_id`` (queued unless ``fields`` say otherwise), charged one
    token as a submission is, committed."""
    job = Job(id=new_id(), user_id=user_id, model="mobilenet", input_url=input_url, **fields)
    ledger.charge_jobs(session, user_id, [job.id])
    session.add(job)
    session.commit()
    return job
