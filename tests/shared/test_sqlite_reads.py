"""SQLite: a read-only transaction does not queue behind a writer (shared.db.read_only)."""

from __future__ import annotations

import threading

from sqlalchemy import select, text

from shared.db import make_engine, make_session_factory, read_only
from shared.models import User
from tests import support


def test_a_read_only_session_reads_while_another_holds_the_write_lock(tmp_path):
    config = support.migrated(support.test_config(f"sqlite:///{tmp_path / 'r.db'}"))
    sessions = make_session_factory(make_engine(config))
    with sessions() as session:
        user_id = support.add_account(session, 5).id
        session.commit()
    writer = sessions()
    writer.execute(text("UPDATE users SET tokens = tokens + 1"))  # BEGIN IMMEDIATE: held
    got: list[int] = []

    def read() -> None:
        with sessions() as session:
            read_only(session)
            got.append(session.scalar(select(User.tokens).where(User.id == user_id)))

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(10)  # BEGIN IMMEDIATE would wait out the writer (the engine's 30 s timeout)
    try:
        assert got == [5]  # the snapshot before the writer's uncommitted change
    finally:
        writer.rollback()
        writer.close()
        reader.join()
