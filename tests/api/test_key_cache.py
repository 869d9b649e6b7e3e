"""A revoke wins over a lookup in flight in the same API process (issue #23, item 6).

A Bearer lookup reads the key from SQL, then puts it in the process's KeyCache. If
the key was revoked (and forgotten from the cache) between the two, the lookup put
it back, and the revoked key kept working in that process for API_KEY_CACHE_S (seen
on PostgreSQL in 2 of 50 trials with a 0.3 s cache). Here the interleaving is forced:
the lookup's ``put`` waits until the revoke has been answered, on the real database.
"""

from __future__ import annotations

import threading

import pytest

from api import create_app
from api.auth import KeyCache
from tests import support


class _PutWaitsForRevoke(KeyCache):
    """A KeyCache whose first ``put`` waits until the test has revoked the key."""

    def __init__(self, ttl_s: float) -> None:
        super().__init__(ttl_s)
        self.putting = threading.Event()
        self.revoked = threading.Event()

    def put(self, *args, **kwargs) -> None:
        if not self.putting.is_set():
            self.putting.set()
            assert self.revoked.wait(60), "the revoke never came"
        super().put(*args, **kwargs)


def test_a_lookup_in_flight_does_not_put_a_revoked_key_back(api_stack):
    app = create_app(api_stack.config.replace(api_key_cache_s=60))
    cache = app.extensions["imgclf_keys"] = _PutWaitsForRevoke(60)
    user = support.new_user(app.test_client())
    basic = support.basic_auth(user["username"], user["password"])
    keys = app.test_client().get("/v1/keys", headers=basic).get_json()
    (key_id,) = [k["id"] for k in keys["items"]]
    answers: list[int] = []

    def lookup() -> None:  # found in SQL, not yet cached when the revoke comes
        answers.append(app.test_client().get("/v1/me", headers=user["headers"]).status_code)

    in_flight = threading.Thread(target=lookup)
    in_flight.start()
    try:
        assert cache.putting.wait(60), "the lookup never reached the cache"
        revoke = app.test_client().delete(f"/v1/keys/{key_id}", headers=basic)
        assert revoke.status_code == 204, revoke.get_json()
    finally:
        cache.revoked.set()
        in_flight.join(60)
    assert answers == [200]  # it began before the revoke: served, as before
    after = app.test_client().get("/v1/me", headers=user["headers"])
    assert after.status_code == 401, "the revoked key came back from the cache"
    assert after.get_json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("revoke_first", [True, False])
def test_put_and_forget_in_either_order_leave_no_entry(revoke_first):
    cache = KeyCache(60)
    user = _user()
    since = cache.generation()
    if revoke_first:
        cache.forget("k1")
        cache.put("digest", user, "k1", since)
    else:
        cache.put("digest", user, "k1", since)
        cache.forget("k1")
    assert cache.get("digest") is None


def _user():
    from datetime import UTC, datetime

    from shared.models import User

    return User(id=1, username="u", is_admin=False, created_at=datetime.now(UTC))


def test_a_key_read_from_sql_gives_the_caller_a_cache_hit_would(api_stack):
    # Issue #22: a miss reads only the cached columns, in one statement, so that a caller
    # is the same whether its key was cached or not: other columns are read from SQL.
    from sqlalchemy.orm.exc import DetachedInstanceError

    from api.auth import CACHED_USER_COLUMNS, authenticate

    app = create_app(api_stack.config.replace(api_key_cache_s=60))
    user = support.new_user(app.test_client())
    callers = []
    for _ in range(2):  # a miss, then a hit
        with app.test_request_context("/v1/me", headers=user["headers"]):
            callers.append(authenticate())
    assert len(app.extensions["imgclf_keys"]._entries) == 1
    missed, hit = callers
    for caller in callers:
        assert caller.username == user["username"]
        with pytest.raises(DetachedInstanceError):
            _ = caller.tokens
    assert [getattr(missed, c) for c in CACHED_USER_COLUMNS] == [
        getattr(hit, c) for c in CACHED_USER_COLUMNS
    ]
