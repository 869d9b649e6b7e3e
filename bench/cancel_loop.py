"""Submit-and-cancel in a loop: database growth and other users' latency (issue #23 item 3).

Run by hand: ``.venv/bin/python -m bench.cancel_loop [--db sqlite|postgres|both]``.

The API as deployed (``gunicorn -c gunicorn.conf.py``) on a fresh database and the
local Redis, with no worker, and the production rate limits (``RATE_LIMIT_SUBMIT``,
``RATE_LIMIT_BULK_LINES`` at their defaults, unless ``--bulk-lines`` says otherwise).
One user loops "submit 10,000 lines, cancel" for ``--seconds`` (a refused submission
is sent again at once; ``--polite``: after its ``Retry-After``) while four others send
``GET /v1/me``; the script prints the cycles done, the answers the looping user got,
the database's growth in MB (SQLite: the file and its WAL; PostgreSQL:
``pg_database_size``) and the other users' /v1/me p50/p99/max.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import psycopg
import requests

from bench.common import backend, fmt, free_port, libpq_dsn, loadavg, percentile
from bench.hostile_clients import _Client, _fund, start_api
from harness import accounts

LINES = 10_000


def db_bytes(url: str, wal: bool = True) -> int:
    """The database's size: SQLite's file and (``wal``) its WAL, or pg_database_size."""
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        files = (path, Path(f"{path}-wal")) if wal else (path,)
        return sum(p.stat().st_size for p in files if p.exists())
    with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def cancel_loop(
    base: str, user: dict, stop: threading.Event, polite: bool, took: defaultdict
) -> Counter:
    """Submit LINES lines and cancel them until ``stop``; the answers, by kind and status.
    Refused (429), it submits again at once, unless ``polite``. ``took``: seconds per
    answer, by kind and status."""
    body = "\n".join(f"https://images.example.com/{i}.jpg" for i in range(LINES))
    http, answers = requests.Session(), Counter()
    headers = {**user["headers"], "Content-Type": "text/plain"}
    while not stop.is_set():
        start = time.perf_counter()
        resp = http.post(f"{base}/v1/batches", data=body, headers=headers, timeout=120)
        answers[f"submit {resp.status_code}"] += 1
        took[f"submit {resp.status_code}"].append(time.perf_counter() - start)
        if resp.status_code == 429 and polite:  # as a client that honours Retry-After
            stop.wait(float(resp.headers.get("Retry-After", "1")))
            continue
        if resp.status_code != 202:
            continue
        batch_id = resp.json()["id"]
        start = time.perf_counter()
        resp = http.post(
            f"{base}/v1/batches/{batch_id}/cancel", headers=user["headers"], timeout=120
        )
        answers[f"cancel {resp.status_code}"] += 1
        took[f"cancel {resp.status_code}"].append(time.perf_counter() - start)
    return answers


def me_latencies(base: str, users: list[dict], stop: threading.Event) -> tuple[list, list]:
    latencies: list[float] = []
    errors: list[str] = []

    def loop(user: dict) -> None:
        http = requests.Session()
        while not stop.is_set():
            start = time.perf_counter()
            try:
                resp = http.get(f"{base}/v1/me", headers=user["headers"], timeout=60)
                if resp.status_code >= 500:
                    errors.append(str(resp.status_code))
            except requests.RequestException as exc:
                errors.append(type(exc).__name__)
            latencies.append(time.perf_counter() - start)
            stop.wait(0.05)

    threads = [threading.Thread(target=loop, args=(u,)) for u in users]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(120)
    return latencies, errors


def run(db: str, seconds: float, bulk_lines: str | None, polite: bool) -> None:
    overrides = {"rate_limit_submit": "20/second"}  # the production default
    if bulk_lines:
        overrides["rate_limit_bulk_lines"] = bulk_lines
    with tempfile.TemporaryDirectory() as tmp, backend(db, tmp, **overrides) as config:
        port = free_port()
        proc = start_api(config, port)
        base = f"http://127.0.0.1:{port}"
        try:
            users = [accounts.new_user(_Client(base)) for _ in range(5)]
            for u in users:
                _fund(config, u["username"])
            looper, others = users[0], users[1:]
            before = db_bytes(config.database_url)
            before_file = db_bytes(config.database_url, wal=False)
            stop = threading.Event()
            result: dict = {}
            me = threading.Thread(target=lambda: result.update(me=me_latencies(base, others, stop)))
            me.start()
            timer = threading.Timer(seconds, stop.set)
            timer.start()
            took: defaultdict = defaultdict(list)
            answers = cancel_loop(base, looper, stop, polite, took)
            me.join(180)
            grown = (db_bytes(config.database_url) - before) / 1e6
            file_grown = (db_bytes(config.database_url, wal=False) - before_file) / 1e6
            latencies, errors = result["me"]
            ms = [v * 1000 for v in latencies]
            print(
                f"{db}: {seconds:.0f} s of submit {LINES:,} lines + cancel "
                f"(RATE_LIMIT_BULK_LINES={config.rate_limit_bulk_lines}); load {loadavg()}"
            )
            print(f"  looping user's answers: {dict(sorted(answers.items()))}")
            print(
                "  their time, max s: "
                + ", ".join(f"{k} {max(v):.2f}" for k, v in sorted(took.items()))
            )
            wal = f" (the file alone: {file_grown:.1f} MB)" if db == "sqlite" else ""
            print(f"  database growth: {grown:.1f} MB{wal}")
            print(
                f"  other users' GET /v1/me: n={len(ms)} p50 {fmt(percentile(ms, 50))} ms"
                f"  p99 {fmt(percentile(ms, 99))} ms  max {fmt(max(ms, default=float('nan')))} ms"
                f"  errors {len(errors)} {errors[:5]}"
            )
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--bulk-lines", help="RATE_LIMIT_BULK_LINES for this run")
    parser.add_argument(
        "--polite", action="store_true", help="wait Retry-After after a 429 (default: at once)"
    )
    args = parser.parse_args()
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    for db in ("sqlite", "postgres") if args.db == "both" else (args.db,):
        run(db, args.seconds, args.bulk_lines, args.polite)


if __name__ == "__main__":
    main()
