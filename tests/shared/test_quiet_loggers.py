"""Operator commands print what they did, not alembic's start-up chatter (issue #25)."""

from __future__ import annotations

import os
import subprocess

from tests import support


def test_create_admin_prints_no_alembic_plugin_lines(tmp_path):
    config = support.migrated(support.test_config(f"sqlite:///{tmp_path / 'imgclf.db'}"))
    env = {**os.environ, **support.config_env(config), "LOG_LEVEL": "INFO"}
    try:
        run = subprocess.run(
            [".venv/bin/flask", "--app", "api", "create-admin", "root", "--password", "pw-123456"],
            cwd=support.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        support.delete_redis_prefix(config.queue_prefix)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "created administrator root" in run.stdout
    assert "alembic.runtime.plugins" not in run.stdout + run.stderr, run.stderr
