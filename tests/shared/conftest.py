"""Fixtures shared by tests of shared/ that write rows through a real session."""

from __future__ import annotations

import pytest

from shared.db import make_engine, make_session_factory


@pytest.fixture
def session(api_stack):
    """A session on the stack's database (PostgreSQL or SQLite, as ``api_stack`` is)."""
    factory = make_session_factory(make_engine(api_stack.config))
    with factory() as s:
        yield s
