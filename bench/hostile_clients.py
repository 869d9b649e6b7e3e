"""Other users' latency while one client holds the API's resources (issue #14, items 5, 6).

Run by hand: ``.venv/bin/python -m bench.hostile_clients {upload|waits} [--db sqlite]``.

The API as deployed (``gunicorn -c gunicorn.conf.py``) on a fresh database and the
local Redis, with no worker (jobs stay queued, so a long-poll lasts its full wait).
Other users send ``GET /healthz``, ``GET /v1/me`` and ``POST /v1/jobs`` (a write,
which on SQLite needs the write lock) from a few threads, first with the API idle,
then while one user

* ``upload``: sends a multipart upload at 1 byte/s (item 5), or
* ``waits``: holds ``--holds`` long-polls (``GET /v1/jobs/{id}?wait=60``; item 6),

and the script prints p50/p99/max per kind of request and the errors, for both phases.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.common import backend, fmt, free_port, loadavg, percentile
from harness import accounts, services, stack_config, waiting

URL = "http://images.example.com/dog.jpg"
KINDS = ("healthz", "me", "submit")


def start_api(config, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        **stack_config.config_env(config),
        "PORT": str(port),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("GUNICORN_CMD_ARGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"],
        cwd=services.ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{base}/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    waiting.wait_for(up, 60, "gunicorn to answer", interval=0.2)
    return proc


def sample(base: str, users: list[dict], seconds: float, threads: int = 4) -> dict:
    """Other users' requests for ``seconds``: latencies (s) per kind, and the failures."""
    latencies: dict[str, list[float]] = {k: [] for k in KINDS}
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def loop(user: dict) -> None:
        http = requests.Session()
        calls = {
            "healthz": lambda: http.get(f"{base}/healthz", timeout=60),
            "me": lambda: http.get(f"{base}/v1/me", headers=user["headers"], timeout=60),
            "submit": lambda: http.post(
                f"{base}/v1/jobs", json={"url": URL}, headers=user["headers"], timeout=60
            ),
        }
        while time.monotonic() < stop:
            for kind, call in calls.items():
                start = time.perf_counter()
                try:
                    resp = call()
                    if resp.status_code >= 500:
                        errors.append(f"{kind} {resp.status_code}")
                except requests.RequestException as exc:
                    errors.append(f"{kind} {type(exc).__name__}")
                latencies[kind].append(time.perf_counter() - start)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, users[:threads]))
    return {"latencies": latencies, "errors": errors}


def report(name: str, result: dict) -> None:
    print(f"  {name}: load {loadavg()}; errors {len(result['errors'])} {result['errors'][:5]}")
    for kind, values in result["latencies"].items():
        ms = [v * 1000 for v in values]
        print(
            f"    {kind:8} n={len(ms):4}  p50 {fmt(percentile(ms, 50))} ms"
            f"  p99 {fmt(percentile(ms, 99))} ms  max {fmt(max(ms, default=float('nan')))} ms"
        )


def drip_upload(base_port: int, user: dict, photo: bytes, stop: threading.Event) -> str:
    """A multipart upload sent at 1 byte/s until ``stop``; then the rest at once."""
    prepared = requests.Request(
        "POST", "http://x/", files={"file": ("cat.bmp", photo)}, headers=user["headers"]
    ).prepare()
    body = prepared.body
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {user['headers']['Authorization']}\r\n"
        f"Content-Type: {prepared.headers['Content-Type']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", base_port), timeout=120) as sock:
        sock.sendall(head)
        sent = 0
        while not stop.wait(1.0):
            sock.sendall(body[sent : sent + 1])
            sent += 1
        sock.sendall(body[sent:])
        return sock.recv(200).decode(errors="replace").split("\r\n", 1)[0]


def run_upload(base: str, port: int, holder: dict, others: list[dict], seconds: float) -> None:
    photo = (services.ROOT.parent / "shared" / "assets" / "photos" / "cat.bmp").read_bytes()
    # The dripper's key was used a moment ago: authenticating it then writes nothing.
    requests.get(f"{base}/v1/me", headers=holder["headers"], timeout=10)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(drip_upload, port, holder, photo, stop)
        time.sleep(2)  # let the server start reading the body
        report("during a 1 byte/s upload", sample(base, others, seconds))
        stop.set()
        print(f"  the upload itself: {upload.result()}")


def run_waits(base: str, holder: dict, others: list[dict], seconds: float, holds: int) -> None:
    job = requests.post(f"{base}/v1/jobs", json={"url": URL}, headers=holder["headers"], timeout=30)
    job_id = job.json()["id"]
    answers: list[tuple[float, str]] = []

    def hold() -> None:
        start = time.perf_counter()
        try:
            resp = requests.get(
                f"{base}/v1/jobs/{job_id}?wait=60", headers=holder["headers"], timeout=120
            )
            skipped = f"{resp.status_code} {resp.headers.get('X-Wait-Skipped', 'waited')}"
        except requests.RequestException as exc:
            skipped = type(exc).__name__
        answers.append((time.perf_counter() - start, skipped))

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(holds)]
    for t in threads:
        t.start()
    time.sleep(2)  # the waits reach the server
    report(f"while one user holds {holds} waits", sample(base, others, seconds))
    requests.post(f"{base}/v1/jobs/{job_id}/cancel", headers=holder["headers"], timeout=60)
    for t in threads:
        t.join(120)
    kinds: dict[str, list[float]] = {}
    for seconds_taken, outcome in answers:
        kinds.setdefault(outcome, []).append(seconds_taken)
    print(f"  the {holds} waits, by outcome (status, X-Wait-Skipped): count, max seconds")
    for outcome, taken in sorted(kinds.items()):
        print(f"    {outcome:24} {len(taken):4}  {max(taken):6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["upload", "waits"])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=30, help="length of each phase")
    parser.add_argument("--holds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, backend(args.db, tmp) as config:
        port = free_port()
        proc = start_api(config, port)
        base = f"http://127.0.0.1:{port}"
        try:
            users = [accounts.new_user(_Client(base)) for _ in range(5)]
            for u in users:  # enough tokens for every submission of the run
                _fund(config, u["username"])
            holder, others = users[0], users[1:]
            print(f"{args.scenario} on {args.db}, gunicorn -c gunicorn.conf.py, no worker")
            report("idle", sample(base, others, args.seconds))
            if args.scenario == "upload":
                run_upload(base, port, holder, others, args.seconds)
            else:
                run_waits(base, holder, others, args.seconds, args.holds)
        finally:
            proc.terminate()
            proc.wait(60)


class _Client:
    """The few calls harness.accounts.new_user makes, over real HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base

    def post(self, path: str, json: dict):
        resp = requests.post(self.base + path, json=json, timeout=30)
        resp.get_json = resp.json
        return resp


def _fund(config, username: str) -> None:
    from sqlalchemy import select

    from shared import ledger
    from shared.db import make_engine, make_session_factory
    from shared.models import User

    with make_session_factory(make_engine(config))() as session:
        user_id = session.scalars(select(User.id).where(User.username == username)).one()
        ledger.grant(session, user_id, 100_000, ledger.REFILL)
        session.commit()


if __name__ == "__main__":
    main()
