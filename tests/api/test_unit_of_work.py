"""api.services.unit_of_work, the one way the API runs a transaction, on the real databases;
and the rule it serves: routes and pages never run SQL or commit themselves."""

import re

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from api import create_app
from api.services import db, services, unit_of_work
from shared.errors import ServiceUnavailable
from shared.models import User
from tests import support


@pytest.fixture
def app(api_stack):
    return api_stack.app


@pytest.fixture
def account(app):
    return support.new_account(services_of(app).sessions, tokens=3, prefix="uow")


def services_of(app):
    with app.app_context():
        return services()


def _tokens(app, user_id: int) -> int:
    with services_of(app).sessions() as session:
        return session.get_one(User, user_id).tokens


def _set_tokens(user_id: int, tokens: int) -> None:
    db().execute(update(User).where(User.id == user_id).values(tokens=tokens))


def test_a_block_that_ends_is_committed(app, account):
    with app.app_context():
        with unit_of_work():
            _set_tokens(account, 7)
        assert not db().in_transaction()
    assert _tokens(app, account) == 7


def test_a_block_that_returns_is_committed(app, account):
    def service() -> str:
        with unit_of_work():
            _set_tokens(account, 8)
            return "done"

    with app.app_context():
        assert service() == "done"
    assert _tokens(app, account) == 8


def test_a_block_that_raises_writes_nothing(app, account):
    with app.app_context(), pytest.raises(ValueError), unit_of_work():
        _set_tokens(account, 0)
        raise ValueError("refused")
    assert _tokens(app, account) == 3


def test_units_do_not_nest(app):
    with app.app_context(), unit_of_work(), pytest.raises(RuntimeError), unit_of_work():
        pass


def test_a_read_made_before_ends_first(app, account):
    """A read outside any unit (what a request did before) does not swallow the unit's
    options: its transaction ends at the unit's start."""
    with app.app_context():
        db().execute(select(User.id).where(User.id == account))
        with unit_of_work(read_only=True) as session:
            assert session.get_one(User, account).tokens == 3


def test_a_database_that_is_down_is_a_503(api_stack):
    # A real connection to a port where no PostgreSQL listens.
    down = create_app(
        api_stack.config.replace(database_url="postgresql+psycopg://postgres@127.0.0.1:1/imgclf")
    )
    with down.app_context(), pytest.raises(ServiceUnavailable), unit_of_work() as session:
        session.execute(select(User.id))


class _Deadlock(Exception):
    sqlstate = "40P01"  # deadlock_detected, as psycopg reports it


def test_a_deadlock_is_left_for_retry_deadlocks(app):
    """Unit test of the mapping: a deadlock PostgreSQL broke is not a 503, so
    shared.db.retry_deadlocks around the block can run it again."""
    deadlock = OperationalError("UPDATE ...", {}, _Deadlock())
    with app.app_context(), pytest.raises(OperationalError), unit_of_work():
        raise deadlock


def test_routes_and_pages_never_run_sql_or_commit():
    """Routes parse, call a service and serialize (docs/architecture.md, who owns what)."""
    sources = [*(support.ROOT / "api" / "routes").glob("*.py"), support.ROOT / "api/web/views.py"]
    forbidden = re.compile(r"\bcommit\(|\bdb\(\)|\bsessions\(\)|\.execute\(select|\bread_only\(")
    found = {
        f"{path.name}:{number}": line.strip()
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if forbidden.search(line)
    }
    assert found == {}
