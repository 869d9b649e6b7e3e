"""Per-app handles to the outside world, created once in create_app, and the one way a
service runs a transaction (``unit_of_work``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app, g
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from shared import db as shared_db
from shared.config import Config
from shared.db import make_engine, make_session_factory
from shared.errors import ServiceUnavailable
from shared.events import DoneListener
from shared.queue import make_celery
from shared.redis_client import make_redis
from shared.uploads import UploadStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    redis: redis.Redis
    celery: Celery
    uploads: UploadStore
    done: DoneListener  # wakes long polls when their job finishes

    @classmethod
    def build(cls, config: Config) -> Services:
        engine = make_engine(config)
        client = make_redis(config)
        return cls(
            config=config,
            engine=engine,
            sessions=make_session_factory(engine),
            redis=client,
            celery=make_celery(config, main="imgclf-api"),
            uploads=UploadStore(client, config),
            done=DoneListener(client, config),
        )

    def ping_db(self) -> None:
        """One ``SELECT 1`` on a connection of its own (the readiness probe); raises if
        the database does not answer."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def services() -> Services:
    return current_app.extensions["imgclf"]


def db() -> Session:
    """The request's SQL session, closed (and rolled back if uncommitted) at teardown."""
    if "db" not in g:
        g.db = services().sessions()
    return g.db


def close_db(_exc: BaseException | None = None) -> None:
    session = g.pop("db", None)
    if session is not None:
        session.close()


#: session.info's mark of a session inside a unit of work.
_IN_UNIT = "imgclf_unit_of_work"


@contextmanager
def unit_of_work(*, read_only: bool = False) -> Iterator[Session]:
    """The request's session, in one transaction that the ``with`` block owns: committed
    when the block ends (a ``return`` inside it too), rolled back when it raises, so
    nothing is half-written. Every service runs its transactions through this; routes
    and pages never commit.

    A database that cannot be reached (refused or lost connection, pool exhausted, SQLite
    locked past its timeout) raises ``ServiceUnavailable`` (503), for the API and the
    operator's CLI alike. A deadlock PostgreSQL broke is left as it is, for
    ``shared.db.retry_deadlocks`` around the block to run it again.

    ``read_only``: a transaction that writes nothing (``shared.db.read_only``: a plain
    deferred BEGIN on SQLite). A read the request made before, outside any unit, ends
    first, so ``read_only`` and ``shared.db.one_statement`` called first in the block
    apply to this transaction. Units do not nest: the inner commit would end the outer.
    """
    session = db()
    if session.info.get(_IN_UNIT):
        raise RuntimeError("a unit of work is already running on this session")
    if session.in_transaction():
        session.commit()  # a read made before (expire_on_commit=False: objects stay loaded)
    session.info[_IN_UNIT] = True
    try:
        if read_only:
            shared_db.read_only(session)
        yield session
        session.commit()
    except BaseException as exc:
        session.rollback()
        if _unreachable(exc):
            log.warning("database unavailable: %r", exc)
            raise ServiceUnavailable() from exc
        raise
    finally:
        session.info.pop(_IN_UNIT, None)


def _unreachable(exc: BaseException) -> bool:
    """The database did not answer: down, restarting, out of connections, locked."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | PoolTimeout) and not shared_db.is_retryable(exc)
