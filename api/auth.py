"""Authentication: HTTP Basic (bcrypt) or Bearer API keys (sha256 lookup, no bcrypt per request)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import bcrypt
from flask import current_app, g, request, session
from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import make_transient_to_detached

from api.errors import check_row_id
from api.ratelimit import limits
from api.schemas import USERNAME_RE
from api.services import db, services, unit_of_work
from shared.db import one_statement
from shared.errors import Forbidden, NotFound, Unauthorized, ValidationFailed
from shared.models import ApiKey, User, as_utc, utcnow

KEY_PREFIX = "ick_"
PREFIX_LEN = len(KEY_PREFIX) + 8
LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_PASSWORD_BYTES = 72  # bcrypt ignores (bcrypt>=5: rejects) anything longer

F = TypeVar("F", bound=Callable[..., Any])


@functools.lru_cache(maxsize=4)
def dummy_hash(rounds: int) -> bytes:
    """Checked against when the username is unknown, so timing does not reveal which names
    exist: it must cost what a real hash costs (BCRYPT_ROUNDS), and is computed once."""
    return bcrypt.hashpw(b"not-a-password", bcrypt.gensalt(rounds=rounds))


def hash_password(password: str) -> str:
    rounds = services().config.bcrypt_rounds
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def check_password(password: str, password_hash: str | None) -> bool:
    data = password.encode()
    if len(data) > MAX_PASSWORD_BYTES:
        return False
    if password_hash is None:
        bcrypt.checkpw(data, dummy_hash(services().config.bcrypt_rounds))
        return False
    return bcrypt.checkpw(data, password_hash.encode())


def validate_username(username: str) -> None:
    """The same rule for every way in (/v1/users, /register, the sign-up page)."""
    if not USERNAME_RE.fullmatch(username):
        raise ValidationFailed(
            "Usernames are 3 to 64 letters, digits, '_', '.' or '-'.", code="invalid_username"
        )


def validate_password(password: str) -> None:
    if len(password) < 6 or len(password.encode()) > MAX_PASSWORD_BYTES:
        raise ValidationFailed("Password must be 6 to 72 bytes long.", code="invalid_password")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key(user_id: int, name: str = "") -> tuple[ApiKey, str]:
    """Create a key row (caller adds and commits); the plain key is returned once, never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(user_id=user_id, name=name, prefix=key[:PREFIX_LEN], key_hash=hash_key(key))
    return row, key


def user_by_password(username: str | None, password: str | None) -> User:
    if not username or password is None:
        raise Unauthorized("Username and password are required.")
    limits().check_login(username)
    # bcrypt is slow on purpose: the read ends before it.
    with unit_of_work(read_only=True) as db_session:
        user = db_session.scalars(select(User).where(User.username == username)).first()
    if not check_password(password, user.password_hash if user else None):
        limits().record_login_failure(username)
        raise Unauthorized("Wrong username or password.", code="invalid_credentials")
    assert user is not None  # check_password refuses a missing user
    return user


#: The user columns a cached key carries. id, username and created_at never change;
#: is_admin can (promote), so admin_required and /v1/me read it from SQL. ``tokens`` and
#: the webhook secrets are left out on purpose: reading them from a cached caller raises
#: instead of showing a stale value.
CACHED_USER_COLUMNS = ("id", "username", "is_admin", "created_at")


class KeyCache:
    """API keys that passed the SQL lookup, held per API process for ``API_KEY_CACHE_S``.

    A Bearer request is then authenticated with no SQL at all. Only successes are kept,
    keyed by the key's sha256 (never the key): a wrong, unknown or revoked key always
    goes to SQL, so no cache entry can let a bad key in. A revoke forgets the key at
    once in the process that served it (``forget``); other API processes stop accepting
    it within ``API_KEY_CACHE_S`` at most. 0 turns the cache off.

    A lookup that read the key from SQL just before a revoke in this process must not
    put it back afterwards: every ``forget`` moves the cache to a new generation, and
    ``put`` stores nothing if the generation changed since its lookup began
    (``generation()`` before the SQL read). Both happen under one lock, so the revoke
    wins in its own process whichever order the two threads reach it.
    """

    MAX_ENTRIES = 10_000  # past this the cache starts over: a bound on memory, not an LRU

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, str, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._generation = 0

    def generation(self) -> int:
        """Read before a lookup's SQL query; handed to ``put`` with its result."""
        return self._generation

    def get(self, digest: str) -> tuple[User, str] | None:
        """A fresh detached copy of the caller and the key's id, or None."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        until, key_id, columns = entry
        if time.monotonic() >= until:
            self._entries.pop(digest, None)
            return None
        return cached_user(columns), key_id

    def put(self, digest: str, user: User, key_id: str, since: int | None = None) -> None:
        """Keep a key that SQL accepted; ``since``: ``generation()`` before that lookup."""
        if self.ttl_s <= 0:
            return
        columns = {name: getattr(user, name) for name in CACHED_USER_COLUMNS}
        with self._lock:
            if since is not None and since != self._generation:
                return  # a key was revoked meanwhile: maybe this one (a miss costs one query)
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + self.ttl_s, key_id, columns)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._generation += 1
            # A copy first (one C call, atomic): get() drops expired entries unlocked.
            for digest, (_, cached_id, _) in list(self._entries.items()):
                if cached_id == key_id:
                    self._entries.pop(digest, None)


def cached_user(columns: dict[str, Any]) -> User:
    """A caller made of its ``CACHED_USER_COLUMNS`` alone; reading any other column raises.

    A copy per request: gunicorn threads never share one ORM object. Detached, not
    transient, so a session that sees it never INSERTs it.
    """
    user = User(**columns)
    make_transient_to_detached(user)
    return user


def key_cache() -> KeyCache:
    return current_app.extensions["imgclf_keys"]


def _user_by_key(key: str, use_cache: bool = True) -> User:
    digest = hash_key(key)
    cache = key_cache()
    if not use_cache:
        return _user_by_key_from_sql(digest)
    if hit := cache.get(digest):
        user, g.api_key_id = hit
        return user
    since = cache.generation()  # before the SQL read: a revoke after it must win
    # The cached columns alone, as a cache hit carries them: one autocommit statement,
    # no ORM entity (a miss is every API_KEY_CACHE_S per key and process).
    with unit_of_work(read_only=True) as db_session:
        one_statement(db_session)
        row = db_session.connection().execute(_KEY_LOOKUP, {"digest": digest}).first()
    if row is None:
        raise Unauthorized("Invalid or revoked API key.", code="invalid_api_key")
    *values, key_id, last = row
    user = cached_user(dict(zip(CACHED_USER_COLUMNS, values, strict=True)))
    _record_use(key_id, last)
    cache.put(digest, user, key_id, since)
    g.api_key_id = key_id
    return user


#: A key's caller (``CACHED_USER_COLUMNS``), its id and when it was last used, if it is
#: not revoked. Built once: compiled once.
_KEY_LOOKUP = (
    select(*(User.__table__.c[name] for name in CACHED_USER_COLUMNS), ApiKey.id)
    .add_columns(ApiKey.last_used_at)
    .join(ApiKey, ApiKey.user_id == User.id)
    .where(ApiKey.key_hash == bindparam("digest"), ApiKey.revoked_at.is_(None))
)


def _record_use(key_id: str, last: datetime | None) -> None:
    """Record a key's use at a coarse resolution, so authenticating is not a write per
    request (a cached key is recorded when it is looked up again, API_KEY_CACHE_S later
    at most)."""
    now = utcnow()
    if last is not None and as_utc(last) >= now - LAST_USED_RESOLUTION:
        return
    with unit_of_work() as db_session:
        one_statement(db_session)
        db_session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))


def _user_by_key_from_sql(digest: str) -> User:
    """The caller as a whole row, never from the cache (``admin_required``)."""
    with unit_of_work(read_only=True) as db_session:
        row = db_session.execute(
            select(User, ApiKey.id, ApiKey.last_used_at)
            .join(ApiKey, ApiKey.user_id == User.id)
            .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
        ).first()
    if row is None:
        raise Unauthorized("Invalid or revoked API key.", code="invalid_api_key")
    user, key_id, last = row
    _record_use(key_id, last)
    g.api_key_id = key_id
    return user


CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


WEB_SESSION, WEB_NEW_KEY = "web-session", "web-new-key"


def server_session_key(kind: str, sid: str | None = None) -> str | None:
    """The Redis key of this browser session's server-side state (``kind``), or None.

    Only a hash of the session id is stored, so a Redis dump holds no usable session.
    """
    sid = sid or session.get("sid")
    return _session_key(kind, sid) if isinstance(sid, str) else None


def _session_key(kind: str, sid: str) -> str:
    digest = hashlib.sha256(sid.encode()).hexdigest()
    return f"{services().config.queue_prefix}:{kind}:{digest}"


def log_in(user: User) -> None:
    """Start a browser session (the web pages); API clients use keys or Basic instead.

    The cookie is signed but lives on the client, so it alone cannot be revoked: the
    session is also recorded in Redis, checked on every request and deleted at log-out.
    A log-in ends the browser's previous session on the server, as a log-out would, so
    a copy of the old cookie stops working too.
    """
    log_out()
    sid = secrets.token_urlsafe(32)
    services().redis.set(
        _session_key(WEB_SESSION, sid),
        str(user.id),
        ex=current_app.permanent_session_lifetime,
    )
    session["sid"] = sid
    session["uid"] = user.id
    session["csrf"] = secrets.token_urlsafe(32)


def log_out() -> None:
    """End the browser session on the server too: a copy of the cookie stops working."""
    keys = [k for k in (server_session_key(WEB_SESSION), server_session_key(WEB_NEW_KEY)) if k]
    if keys:
        services().redis.delete(*keys)
    session.clear()


def session_user_id() -> int | None:
    """The user id of this cookie's session if the server still has it, else None."""
    uid = session.get("uid")
    if uid is None:
        return None
    key = server_session_key(WEB_SESSION)
    if key is None or services().redis.get(key) != str(uid).encode():
        session.clear()  # logged out elsewhere, expired, or a cookie from before sessions
        return None
    return uid


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def _user_by_session() -> User:
    uid = session_user_id()
    if uid is None:
        raise Unauthorized("Your session has ended; log in again.")
    # A cookie is sent by the browser on its own, so every change needs the CSRF token
    # that only our pages can read.
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token", "")
        # Compared as bytes: compare_digest refuses non-ASCII str.
        if not hmac.compare_digest(sent.encode(), session.get("csrf", "").encode()):
            raise Forbidden("Missing or wrong CSRF token.", code="csrf_failed")
    user = session_user(uid)
    if user is None:
        raise Unauthorized("Your session has ended; log in again.")
    return user


def session_user(uid: int) -> User | None:
    """The browser session's user (``session_user_id``), or None (and the cookie cleared)
    when the account is gone."""
    # Read-only: on SQLite every page would otherwise queue behind a batch's insert.
    with unit_of_work(read_only=True) as db_session:
        user = db_session.get(User, uid)
    if user is None:
        session.clear()
    return user


def authenticate(use_cache: bool = True) -> User:
    """The caller, with the authentication's transaction ended.

    Views read the request body after this; a body can arrive slowly (an upload at a
    byte a second), and no transaction may stay open meanwhile: on SQLite it holds the
    write lock (a transaction that may write begins IMMEDIATE), on PostgreSQL a pooled
    connection.

    A Bearer key may be answered from the process's ``KeyCache`` (``use_cache``): then
    the caller carries only ``CACHED_USER_COLUMNS``; read anything else from SQL.
    """
    # Each way in ends its own transaction (expire_on_commit=False: the user's loaded
    # columns stay readable); a cached key runs none.
    return _authenticate(use_cache)


def _authenticate(use_cache: bool) -> User:
    header = request.headers.get("Authorization", "")
    if not header and session.get("uid") is not None:
        return _user_by_session()
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return _user_by_key(credentials.strip(), use_cache)
    if scheme.lower() == "basic" and request.authorization:
        auth = request.authorization
        return user_by_password(auth.username, auth.password)
    raise Unauthorized(
        "Send an API key as 'Authorization: Bearer <key>' or use HTTP Basic auth.",
        headers={"WWW-Authenticate": 'Basic realm="imgclf", Bearer'},
    )


def login_required(view: F) -> F:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        g.user = authenticate()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def admin_required(view: F) -> F:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Never from the key cache: is_admin can change (promote) while a key is cached.
        g.user = authenticate(use_cache=False)
        if not g.user.is_admin:
            raise Forbidden("This action needs an administrator.", code="admin_required")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def owned(model: Any, row_id: str, noun: str, user: User | None = None) -> Any:
    """``user``'s (default: the caller's) row of ``model`` (a job or a batch); someone
    else's is indistinguishable from a missing one, and so is an id no row can have."""
    check_row_id(row_id, noun)
    row = db().get(model, row_id)
    if row is None or row.user_id != (user or g.user).id:
        raise NotFound(f"No such {noun}.", code=f"{noun}_not_found")
    return row
