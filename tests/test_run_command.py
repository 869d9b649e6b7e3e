"""The README's run command, run for real: gunicorn, a worker, migrations, SQLite."""

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import redis
import requests

from shared.config import Config
from shared.queue import webhook_worker_ready_key, worker_ready_key
from tests import support


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MakeRun:
    """``make run`` in its own process group, as a terminal runs it."""

    def __init__(self, tmp_path: Path, redis_url: str, sigint_ignored: bool = False) -> None:
        self.port, self.prefix = _free_port(), support.new_prefix("run")
        self.redis_url = redis_url
        self.log_path = tmp_path / "run.log"
        env = {
            **os.environ,
            "PORT": str(self.port),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'run.db'}",
            "REDIS_URL": redis_url,
            "QUEUE_PREFIX": self.prefix,
            "ALLOW_PRIVATE_URLS": "1",
            "BCRYPT_ROUNDS": "4",
        }
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            ["make", "run"],
            cwd=support.ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # As a background job of a script starts it (POSIX: SIGINT ignored).
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
            if sigint_ignored
            else None,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready():
            assert self.proc.poll() is None, self.output()[-3000:]
            try:
                up = requests.get(f"{self.base}/readyz", timeout=2).status_code == 200
            except requests.RequestException:  # not listening yet, or still booting
                return False
            client = redis.Redis.from_url(self.redis_url)
            config = Config(queue_prefix=self.prefix)
            hashes = (worker_ready_key(config), webhook_worker_ready_key(config))
            return up and all(client.hlen(h) for h in hashes)

        support.wait_for(ready, 180, "make run to serve", interval=0.5)

    def sign_up(self) -> str:
        signup = requests.post(
            f"{self.base}/v1/users",
            timeout=10,
            json={"username": "runner", "password": "run-run-run"},
        )
        assert signup.status_code == 201
        return signup.json()["api_key"]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        finally:
            # The run's children have process groups of their own: a killed script leaves them.
            for pid in self.processes():
                os.kill(pid, signal.SIGKILL)

    def processes(self, command: bytes = b"") -> list[int]:
        """Pids of this run's processes (by its QUEUE_PREFIX) whose command has ``command``."""
        marker = f"QUEUE_PREFIX={self.prefix}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            try:
                environ = (entry / "environ").read_bytes()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # not a process, or gone
                continue
            if marker in environ.split(b"\0") and command in cmdline:
                found.append(int(entry.name))
        return found

    def classification_worker_pid(self) -> int:
        """The worker's main process (its pool processes are its children)."""
        pids = set(self.processes(b"worker.celery_app"))
        main = [pid for pid in pids if _parent(pid) not in pids]
        assert main, "no classification worker found"
        return main[0]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):  # gone
        return 0


def test_make_run_serves_classifications_and_ctrl_c_stops_it(tmp_path, photo_server):
    # Started with SIGINT ignored, the run script could not trap it while the workers
    # did, and stopped as if they had crashed (issue #24): SIGINT must still mean stop.
    run = MakeRun(tmp_path, support.REDIS_URL, sigint_ignored=True)
    try:
        run.wait_ready()
        resp = requests.post(
            f"{run.base}/v1/jobs",
            json={"url": photo_server.url("parrot.jpg")},
            headers={**support.bearer(run.sign_up()), "Prefer": "wait=60"},
            timeout=70,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["result"]["predictions"][0]["label"] == "macaw"
        assert requests.get(f"{run.base}/openapi.json", timeout=10).status_code == 200
    finally:
        # What Ctrl-C sends to the terminal's process group: a stop, not a crash (issue #24).
        code = run.stop(signal.SIGINT)
        left = run.processes()
        support.delete_redis_prefix(run.prefix)
    output = run.output()
    assert "stopped" in output
    assert "exited on its own" not in output, output[-3000:]
    assert code in (0, -signal.SIGINT), output[-3000:]  # make dies of the SIGINT, as it should
    assert left == []  # "stopped" means every process of the run has ended
    assert "Error" not in output and "SIGKILL" not in output, output[-3000:]
    # The Redis it found running is not its own to stop.
    assert redis.Redis.from_url(support.REDIS_URL).ping()


def test_make_run_stops_everything_when_a_process_dies(tmp_path):
    """A dead worker is named, the API's long polls are answered, its own Redis stops."""
    redis_url = f"redis://127.0.0.1:{_free_port()}/0"
    run = MakeRun(tmp_path, redis_url)
    try:
        run.wait_ready()
        assert "started redis-server" in run.output()
        headers = support.bearer(run.sign_up())
        # Stopped before the submission, so the job stays queued: stopped after it, a
        # quick worker had sometimes claimed (and failed) it already.
        os.kill(run.classification_worker_pid(), signal.SIGSTOP)
        job = requests.post(
            f"{run.base}/v1/jobs",
            json={"url": "http://127.0.0.1:9/never.jpg"},
            headers=headers,
            timeout=10,
        ).json()
        polled: list[requests.Response] = []
        poll = threading.Thread(
            target=lambda: polled.append(
                requests.get(f"{run.base}/v1/jobs/{job['id']}?wait=60", headers=headers, timeout=90)
            )
        )
        poll.start()
        os.kill(run.classification_worker_pid(), signal.SIGKILL)
        assert run.proc.wait(90) != 0
        poll.join(30)
    finally:
        run.stop()
    output = run.output()
    assert "the classification worker exited on its own, killed by signal 9" in output, output
    assert "stopped the redis-server this command started" in output
    # The API answered the waiting client when it was stopped, not after its 60 s wait.
    assert polled and polled[0].status_code == 200 and polled[0].json()["status"] == "queued"
    assert "SIGKILL! Perhaps out of memory" not in output
    try:
        alive = redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        alive = False
    assert not alive
