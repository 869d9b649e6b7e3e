"""api.accounts: one sign-up for every way in (v1, seed, sign-up page, create-admin)."""

import uuid

import pytest
from sqlalchemy import select

from api import accounts
from api.services import db, services
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.models import ApiKey, User
from tests import support


def _name(prefix: str = "acct") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def ctx(api_stack):
    with api_stack.app.test_request_context():
        yield api_stack.app


def test_an_administrator_gets_the_same_account_as_a_user(ctx):
    user, _row, _key = accounts.create_user(_name(), "secret-pw")
    admin, row, key = accounts.create_user(_name(), "secret-pw", admin=True)
    assert (user.is_admin, admin.is_admin) == (False, True)
    assert user.tokens == admin.tokens == services().config.signup_tokens
    # Through the request's own session: SQLite takes one writer at a time.
    assert support.ledger_sum(db(), admin.id) == admin.tokens
    keys = db().scalars(select(ApiKey).where(ApiKey.user_id == admin.id)).all()
    assert [(k.id, k.name) for k in keys] == [(row.id, "admin")] and key.startswith("ick_")


def test_an_administrator_obeys_the_username_and_password_rules(ctx):
    with pytest.raises(ValidationFailed) as bad_name:
        accounts.create_user("bad name!", "secret-pw", admin=True)
    with pytest.raises(ValidationFailed) as bad_password:
        accounts.create_user(_name(), "123", admin=True)
    assert (bad_name.value.code, bad_password.value.code) == (
        "invalid_username",
        "invalid_password",
    )


def test_a_taken_username_is_a_conflict(ctx):
    name = _name()
    accounts.create_user(name, "secret-pw")
    with pytest.raises(Conflict) as taken:
        accounts.create_user(name, "secret-pw", admin=True)
    assert taken.value.code == "username_taken"


def test_promote_makes_an_existing_user_admin_and_only_them(ctx):
    user, _row, _key = accounts.create_user(_name(), "secret-pw")
    assert accounts.promote(user.username)
    assert not accounts.promote(_name("nobody"))
    db().expire_all()
    assert db().get(User, user.id).is_admin


def test_refill_goes_through_the_ledger(ctx):
    admin, _row, _key = accounts.create_user(_name(), "secret-pw", admin=True)
    user, _row, _key = accounts.create_user(_name(), "secret-pw")
    signup = services().config.signup_tokens
    assert accounts.refill(user.username, 7, admin) == signup + 7
    with services().sessions() as session:
        assert (
            session.get(User, user.id).tokens == support.ledger_sum(session, user.id) == signup + 7
        )
    with pytest.raises(NotFound) as missing:
        accounts.refill(_name("nobody"), 1, admin)
    assert missing.value.code == "user_not_found"


def test_keys_are_created_listed_and_revoked_per_user(ctx):
    user, first, _key = accounts.create_user(_name(), "secret-pw")
    other, _row, _key = accounts.create_user(_name(), "secret-pw")
    second, _plain = accounts.create_key(user, "ci")
    assert [k.id for k in accounts.active_keys(user)] == [first.id, second.id]
    with pytest.raises(NotFound):
        accounts.revoke_key(other, second.id)  # not theirs: as missing as no key at all
    accounts.revoke_key(user, second.id)
    assert [k.id for k in accounts.active_keys(user)] == [first.id]
    with pytest.raises(NotFound):
        accounts.revoke_key(user, second.id)
