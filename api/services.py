"""Per-app handles to the outside world, created once in create_app."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Config
from shared.db import make_engine, make_session_factory
from shared.events import DoneListener
from shared.queue import make_celery
from shared.redis_client import make_redis
from shared.uploads import UploadStore


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
