"""The submission's per-request path (issue #17): Bearer keys cached per API process,
and a JSON-URL submission in one SQL statement on PostgreSQL."""

import psycopg
import pytest
from sqlalchemy import event, select, update
from sqlalchemy.orm.exc import DetachedInstanceError

from api import accounts, auth
from api.services import db
from shared import db as shared_db
from shared.models import ApiKey, User, utcnow
from tests import support

JOB = {"url": "http://127.0.0.1:9/cat.jpg"}


def _submit(client, user):
    return client.post("/v1/jobs", json=JOB, headers=user["headers"])


def _statements(app):
    """SQL statements sent (SQLAlchemy's BEGIN and COMMIT included) while the context is
    open; on PostgreSQL as psycopg sends them (``support.DriverLog``), so a statement run
    on the driver past SQLAlchemy is seen too."""
    sent: list[str] = []
    engine = app.extensions["imgclf"].engine

    def on_begin(_conn):
        sent.append("BEGIN")

    def on_commit(_conn):
        sent.append("COMMIT")

    def on_statement(statement: str, autocommit: bool) -> None:
        # psycopg in autocommit sends no BEGIN or COMMIT of its own: mark such a statement.
        sent.append(statement.split()[0] + (" (autocommit)" if autocommit else ""))

    def on_execute(_conn, _cursor, statement, *_args):
        if not statement.startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE (shared/db.py)
            on_statement(statement, False)

    hooks = [("begin", on_begin), ("commit", on_commit)]
    driver = None
    if engine.dialect.name == "postgresql":
        driver = support.DriverLog(engine, on_statement).__enter__()
    else:
        hooks.append(("before_cursor_execute", on_execute))
    for name, hook in hooks:
        event.listen(engine, name, hook)

    def stop() -> None:
        for name, hook in hooks:
            event.remove(engine, name, hook)
        if driver is not None:
            driver.__exit__()

    return sent, stop


def test_a_submission_with_a_known_key_is_one_transaction(api_stack, client, user):
    assert _submit(client, user).status_code == 202  # the key is now cached
    sent, stop = _statements(api_stack.app)
    try:
        assert _submit(client, user).status_code == 202
    finally:
        stop()
    if api_stack.config.database_url.startswith("postgresql"):
        # No authentication query; charge, ledger row and job in one statement, sent
        # alone on the driver (no SQLAlchemy transaction at all): one round trip.
        assert sent == ["WITH (autocommit)"]
    else:
        assert sent == ["BEGIN", "UPDATE", "INSERT", "INSERT", "COMMIT"]


def _kill_pooled_connections(engine) -> None:
    """Terminate every connection idle in ``engine``'s pool, as a restart would."""
    pooled = [engine.raw_connection() for _ in range(engine.pool.checkedin())]
    pids = [conn.driver_connection.info.backend_pid for conn in pooled]
    for conn in pooled:
        conn.close()
    with psycopg.connect(support.admin_dsn(), autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_submission_that_meets_a_lost_connection_is_a_503_and_charges_nothing(
    api_stack, client, user, monkeypatch
):
    """The submission's statement runs on the driver (shared.db.DriverStatement): a
    pooled connection a restart killed is a 503, as through a session, nothing is
    charged, and the pool is emptied, so the next submission reconnects."""
    if not api_stack.config.database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's driver path; SQLite has no connections to lose")
    monkeypatch.setattr(shared_db, "PING_AFTER_IDLE_S", 3600)  # no ping saves it
    assert _submit(client, user).status_code == 202  # the key is now cached
    before = client.get("/v1/me", headers=user["headers"]).get_json()["tokens"]
    _kill_pooled_connections(api_stack.app.extensions["imgclf"].engine)
    lost = _submit(client, user)
    assert lost.status_code == 503
    assert lost.get_json()["error"]["code"] == "service_unavailable"
    assert client.get("/v1/me", headers=user["headers"]).get_json()["tokens"] == before
    assert _submit(client, user).status_code == 202
    assert client.get("/v1/me", headers=user["headers"]).get_json()["tokens"] == before - 1


def test_with_an_idempotency_key_the_submission_stays_one_transaction(api_stack, client, user):
    """The key's lookup and stored answer commit with the charge, or nothing does."""
    assert _submit(client, user).status_code == 202  # the key is now cached
    headers = {**user["headers"], "Idempotency-Key": "one-transaction"}
    sent, stop = _statements(api_stack.app)
    try:
        first = client.post("/v1/jobs", json=JOB, headers=headers)
    finally:
        stop()
    again = client.post("/v1/jobs", json=JOB, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    if api_stack.config.database_url.startswith("postgresql"):
        assert sent == ["BEGIN", "SELECT", "WITH", "INSERT", "COMMIT"]


def test_the_balance_is_read_fresh_for_a_cached_key(client, user):
    """GET /v1/me with a cached key shows the balance as SQL has it, not as cached."""
    before = client.get("/v1/me", headers=user["headers"]).get_json()["tokens"]
    assert _submit(client, user).status_code == 202
    assert client.get("/v1/me", headers=user["headers"]).get_json()["tokens"] == before - 1


def test_a_revoked_key_stops_at_once_in_this_process(client, user):
    assert _submit(client, user).status_code == 202  # cached
    second = client.post("/v1/keys", json={"name": "two"}, headers=user["headers"]).get_json()
    other = support.bearer(second["key"])
    assert client.get("/v1/me", headers=other).status_code == 200  # cached too
    assert client.delete(f"/v1/keys/{second['id']}", headers=user["headers"]).status_code == 204
    resp = client.get("/v1/me", headers=other)
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_api_key"


def test_a_key_revoked_elsewhere_stops_within_the_cache_time(api_stack, client, user, monkeypatch):
    """Revoked by another API process (here: SQL directly): refused once API_KEY_CACHE_S passed."""
    assert _submit(client, user).status_code == 202  # cached
    with api_stack.app.app_context():
        session = api_stack.app.extensions["imgclf"].sessions()
        session.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == auth.hash_key(user["key"]))
            .values(revoked_at=utcnow())
        )
        session.commit()
        session.close()
    now = auth.time.monotonic()
    ttl = api_stack.config.api_key_cache_s
    monkeypatch.setattr(auth.time, "monotonic", lambda: now + ttl)
    resp = client.get("/v1/me", headers=user["headers"])
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_api_key"


def test_a_wrong_key_is_never_cached(api_stack, client, user):
    cache = api_stack.app.extensions["imgclf_keys"]
    wrong = user["key"][:-1] + ("A" if user["key"][-1] != "A" else "B")
    for _ in range(2):
        assert client.get("/v1/me", headers=support.bearer(wrong)).status_code == 401
        assert cache.get(auth.hash_key(wrong)) is None
    assert client.get("/v1/me", headers=user["headers"]).status_code == 200
    assert cache.get(auth.hash_key(user["key"])) is not None
    assert client.get("/v1/me", headers=support.bearer(wrong)).status_code == 401


def test_administrator_rights_are_never_taken_from_the_cache(api_stack, client, user):
    """A key cached before its user was promoted works for admin routes at once."""
    assert _submit(client, user).status_code == 202  # cached, is_admin False
    with api_stack.app.test_request_context():
        assert accounts.promote(user["username"])
    refill = {"username": user["username"], "amount": 3}
    resp = client.post("/v1/admin/refill", json=refill, headers=user["headers"])
    assert resp.status_code == 200, resp.get_json()


def test_a_cached_caller_carries_no_balance(api_stack, user):
    """Reading a column the cache does not hold raises: never a stale balance."""
    with api_stack.app.test_request_context():
        row = (
            db()
            .execute(
                select(User, ApiKey.id)
                .join(ApiKey, ApiKey.user_id == User.id)
                .where(ApiKey.key_hash == auth.hash_key(user["key"]))
            )
            .first()
        )
    cache, off = auth.KeyCache(60), auth.KeyCache(0)
    for each in (cache, off):
        each.put("digest", row[0], row[1])
    assert off.get("digest") is None  # API_KEY_CACHE_S=0 turns it off
    copy, key_id = cache.get("digest")
    assert (copy.id, copy.username, key_id) == (row[0].id, user["username"], row[1])
    with pytest.raises(DetachedInstanceError):
        copy.tokens  # noqa: B018
