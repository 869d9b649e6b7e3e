"""Start ``make run`` and stop it with Ctrl-C, N times; count the clean stops (issue #24).

    .venv/bin/python scripts/stop_loop.py 50 [--budget-s 3000] [--killpg] [--sigint-ignored]

Each try runs ``make run`` on a terminal of its own (a pty, as a developer does), waits
until the API and both workers are ready, then types Ctrl-C (with ``--killpg``: sends
SIGINT to make's process group, as tests/test_run_command.py does; with
``--sigint-ignored``, make starts with SIGINT ignored, as a background job of a script
does). A clean stop is: make
ends by the SIGINT or with status 0 (not 1), "stopped" printed, no "exited on its own", and
no process of the run left. Every try uses its own SQLite file, queue prefix and port; the
Redis on REDIS_URL (default 127.0.0.1:6379/0) is only read and written under that prefix.
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.config import Config  # noqa: E402
from shared.queue import webhook_worker_ready_key, worker_ready_key  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def one_try(n: int, workdir: Path, killpg: bool, sigint_ignored: bool) -> tuple[bool, str]:
    port, prefix = _free_port(), f"stoploop-{os.getpid()}-{n}"
    env = {
        **os.environ,
        "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{workdir / f'run{n}.db'}",
        "REDIS_URL": REDIS_URL,
        "QUEUE_PREFIX": prefix,
        "BCRYPT_ROUNDS": "4",
    }
    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader with the pty as its terminal, like a shell's job
        os.chdir(ROOT)
        if sigint_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.execvpe("make", ["make", "run"], env)
    out = bytearray()

    def drain(timeout: float) -> None:
        while select.select([fd], [], [], timeout)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            out.extend(chunk)
            timeout = 0

    client = redis.Redis.from_url(REDIS_URL)
    config = Config(queue_prefix=prefix)
    deadline = time.monotonic() + 300
    ready = False
    while time.monotonic() < deadline and not ready:
        drain(1.0)
        try:
            up = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            up = False
        keys = (worker_ready_key(config), webhook_worker_ready_key(config))
        ready = up and all(client.hlen(k) for k in keys)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    if killpg:
        os.killpg(pid, signal.SIGINT)
    else:
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground group
    status = None
    deadline = time.monotonic() + 120
    while status is None and time.monotonic() < deadline:
        drain(0.5)
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else None
    drain(0.5)
    os.close(fd)
    left = _pids_with(f"QUEUE_PREFIX={prefix}".encode())
    for p in left:
        os.kill(p, signal.SIGKILL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    text = out.decode(errors="replace")
    clean = (
        ready
        and status is not None
        and os.waitstatus_to_exitcode(status) in (0, -signal.SIGINT)
        and "stopped" in text
        and "exited on its own" not in text
        and not left
    )
    exit_code = None if status is None else os.waitstatus_to_exitcode(status)
    return clean, f"ready={ready} exit={exit_code} left={left}\n{text[-2000:]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tries", type=int)
    parser.add_argument("--budget-s", type=float, default=3600)
    parser.add_argument("--killpg", action="store_true")
    parser.add_argument("--sigint-ignored", action="store_true")
    args = parser.parse_args()
    start, clean, tried = time.monotonic(), 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.tries):
            if time.monotonic() - start > args.budget_s:
                break
            ok, detail = one_try(n, Path(tmp), args.killpg, args.sigint_ignored)
            clean += ok
            tried += 1
            print(f"try {n + 1}: {'clean' if ok else 'NOT CLEAN'}", flush=True)
            if not ok:
                print(detail, flush=True)
    print(f"clean stops: {clean} of {tried} ({time.monotonic() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
