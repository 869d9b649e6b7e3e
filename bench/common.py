"""Shared set-up for benchmarks: real databases, Redis, an app, users with tokens."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager

from sqlalchemy import select

from shared import ledger
from shared.models import User
from tests import support


@contextmanager
def backend(name: str, tmp_dir: str, **overrides):
    """A migrated database of kind ``name`` ("postgres" or "sqlite") and its Config."""
    if name == "postgres":
        url = support.create_postgres_database()
    else:
        url = f"sqlite:///{tmp_dir}/bench.db"
    config = support.migrated(support.test_config(url, **overrides))
    try:
        yield config
    finally:
        support.delete_redis_prefix(config.queue_prefix)
        if name == "postgres":
            support.drop_postgres_database(url)


def funded_user(app, tokens: int) -> dict:
    """A user made through the API, then given ``tokens`` more by a direct ledger grant."""
    from api.services import services

    user = support.new_user(app.test_client())
    with app.app_context(), services().sessions() as session:
        user_id = session.scalars(select(User.id).where(User.username == user["username"])).one()
        ledger.grant(session, user_id, tokens, ledger.REFILL)
        session.commit()
    return user


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return (
        f"{platform.node()} ({cpu} cores, {platform.machine()}, Python {platform.python_version()})"
    )
