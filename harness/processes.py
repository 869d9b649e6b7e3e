"""The service's Celery workers as real processes, configured by a ``Config``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from harness.services import OUTPUT, ROOT
from harness.stack_config import config_env
from harness.waiting import wait_for
from shared.config import Config
from shared.queue import webhook_queue

WORKER_START_TIMEOUT_S = 120


#: The ``celery`` program of the interpreter running the tests: ``.venv/bin/celery``.
CELERY_PROGRAM = Path(sys.executable).parent / "celery"


class WorkerProcess:
    """``celery -A worker.celery_app worker`` in a subprocess, configured by ``config``.

    ``as_documented``: started with the ``celery`` program, as the README, the Makefile
    and the Dockerfile start it, instead of ``python -m celery``. The two differ: the
    program's sys.path lacks the working directory (Celery puts it there only while it
    imports the app), and spawned children inherit that sys.path. ``env``: more
    environment for the worker and its children.
    """

    app_module = "worker.celery_app"
    ready_hash = "workers:ready"

    def __init__(
        self,
        config: Config,
        name: str = "w1",
        *,
        as_documented: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.as_documented = as_documented
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        OUTPUT.mkdir(parents=True, exist_ok=True)
        self.log_path = OUTPUT / f"{name}-{config.queue_prefix}.log"

    def pool_args(self) -> list[str]:
        return []  # WORKER_POOL and WORKER_CONCURRENCY from the config, as in production

    def start(self) -> WorkerProcess:
        env = {
            **os.environ, **config_env(self.config), "PYTHONUNBUFFERED": "1", **self.extra_env
        }  # fmt: skip
        program = [str(CELERY_PROGRAM)] if self.as_documented else [sys.executable, "-m", "celery"]
        cmd = [
            *program, "-A", self.app_module, "worker", *self.pool_args(),
            "--hostname", f"{self.name}-{self.config.queue_prefix}@%h", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        # Its own process group, so a test can kill the worker with its pool processes.
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once: a crash, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def ready_count(self) -> int:
        client = redis.Redis.from_url(self.config.redis_url)
        return client.hlen(f"{self.config.queue_prefix}:{self.ready_hash}")

    def wait_ready(self, before: int = 0) -> WorkerProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}): {self.log_tail()}")
            return self.ready_count() > before

        wait_for(ready, WORKER_START_TIMEOUT_S, f"{self.name} to be ready", interval=0.1)
        return self

    def stop(self, timeout: float = 40) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        return self.log()[-n:]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class WebhookWorkerProcess(WorkerProcess):
    """``celery -A worker.webhook_app worker --pool threads``: the webhook deliverer."""

    app_module = "worker.webhook_app"
    ready_hash = "webhook-workers:ready"

    def __init__(self, config: Config, name: str = "webhooks", concurrency: int = 4) -> None:
        super().__init__(config, name)
        self.concurrency = concurrency

    def pool_args(self) -> list[str]:
        return [
            "--pool",
            "threads",
            "--concurrency",
            str(self.concurrency),
            "-Q",
            webhook_queue(self.config),
        ]
