"""The README's run command, run for real: gunicorn, a worker, migrations, SQLite."""

import os
import signal
import socket
import subprocess

import redis
import requests

from tests import support


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_run_serves_classifications(tmp_path, photo_server):
    port, prefix = _free_port(), support.new_prefix("run")
    env = {
        **os.environ,
        "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'run.db'}",
        "REDIS_URL": support.REDIS_URL,
        "QUEUE_PREFIX": prefix,
        "ALLOW_PRIVATE_URLS": "1",
        "BCRYPT_ROUNDS": "4",
    }
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        ["make", "run"],
        cwd=support.ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            try:
                up = requests.get(f"{base}/readyz", timeout=2).status_code == 200
            except requests.RequestException:  # not listening yet, or still booting
                return False
            client = redis.Redis.from_url(support.REDIS_URL)
            workers = [
                client.hlen(f"{prefix}:{h}") for h in ("workers:ready", "webhook-workers:ready")
            ]
            return up and all(workers)

        support.wait_for(ready, 180, "make run to serve", interval=0.5)
        signup = requests.post(
            f"{base}/v1/users", timeout=10, json={"username": "runner", "password": "run-run-run"}
        )
        assert signup.status_code == 201
        key = signup.json()["api_key"]
        resp = requests.post(
            f"{base}/v1/jobs",
            json={"url": photo_server.url("parrot.jpg")},
            headers={**support.bearer(key), "Prefer": "wait=60"},
            timeout=70,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["result"]["predictions"][0]["label"] == "macaw"
        assert requests.get(f"{base}/openapi.json", timeout=10).status_code == 200
    finally:
        _stop(proc)
        support.delete_redis_prefix(prefix)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
