"""Other users' latency while 1,000 connections drip headers or bodies (issue #23, item 1).

Run by hand: ``.venv/bin/python -m bench.slow_clients [--drippers 1000] [--direct]``.

The production front door on this machine: nginx with deploy/nginx.conf
(harness/front_proxy.py rewrites only its port, upstream and paths) in front of the
API under ``gunicorn -c gunicorn.conf.py`` (its default processes and threads), on a
fresh PostgreSQL database and the local Redis, with no worker. Other users send
``GET /healthz``, ``GET /v1/me`` and ``POST /v1/jobs`` from a few threads
(bench/hostile_clients.py's ``sample``), first with the API idle, then while
``--drippers`` connections, 4 per loopback address (250 addresses for 1,000, under
nginx's 32 per address), send

* ``headers``: a request header at a byte a second (cut off after nginx's
  client_header_timeout, and then they connect again, as an attacker would), then
* ``bodies``: a whole header, then the body at a byte a second.

It prints p50/p99/max per kind of request and the failures for each phase, and
what happened to the drippers. ``--direct`` points the drippers and the users at
gunicorn itself instead (the deployment before nginx; expect failures).
The open-file limit is raised to its hard limit first: each dripper is a descriptor
here and one or two in nginx.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import requests

from bench.common import backend, free_port, loadavg, machine
from bench.hostile_clients import _Client, _fund, report, sample
from harness import accounts, front_proxy

PER_ADDRESS = 4


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        raise SystemExit(f"ulimit -n is {soft}; {needed} descriptors needed: raise it")
    return soft


def phase(kind: str, count: int, port: int, base: str, holder: dict, others, seconds: float):
    drips = front_proxy.spread(kind, count, per_address=PER_ADDRESS)
    drippers = front_proxy.Drippers(
        port, holder["headers"]["Authorization"], drips, reconnect=True
    ).start()
    try:
        time.sleep(3)  # every dripper connected and sending
        result = sample(base, others, seconds)
    finally:
        open_now = sum(d.outcome == "open" for d in drips)
        connections = sum(d.connections for d in drips)
        outcomes: dict[str, int] = {}
        for d in drips:
            outcomes[d.outcome] = outcomes.get(d.outcome, 0) + 1
        drippers.stop()
    report(f"while {count} connections drip {kind} at 1 byte/s", result)
    print(
        f"  drippers: {open_now} still open at the end, {connections} connections made "
        f"(reconnects after a cut), last outcomes {outcomes}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drippers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30, help="length of each phase")
    parser.add_argument("--direct", action="store_true", help="no nginx: straight to gunicorn")
    parser.add_argument("--kinds", default="header,body")
    args = parser.parse_args()
    limit = raise_fd_limit(3 * args.drippers + 200)
    print(f"machine: {machine()}; ulimit -n {limit}; load {loadavg()}")
    with tempfile.TemporaryDirectory() as tmp, backend("postgres", tmp) as config:
        work = Path(tmp)
        gunicorn_port, nginx_port = free_port(), free_port()
        with front_proxy.gunicorn(config, gunicorn_port, work / "gunicorn.log") as direct:
            if args.direct:
                run(args, config, direct, gunicorn_port, "gunicorn directly (no proxy)")
                return
            upstream = f"127.0.0.1:{gunicorn_port}"
            with front_proxy.nginx(nginx_port, upstream, work / "nginx") as base:
                run(args, config, base, nginx_port, "nginx (deploy/nginx.conf) -> gunicorn")


def run(args, config, base: str, port: int, front: str) -> None:
    users = [accounts.new_user(_Client(base)) for _ in range(5)]
    for u in users:  # enough tokens for every submission of the run
        _fund(config, u["username"])
    holder, others = users[0], users[1:]
    requests.get(f"{base}/v1/me", headers=holder["headers"], timeout=30)
    print(f"{front}, gunicorn.conf.py defaults, PostgreSQL, no worker")
    report("idle", sample(base, others, args.seconds))
    for kind in args.kinds.split(","):
        phase(kind, args.drippers, port, base, holder, others, args.seconds)
        print(f"  load {loadavg()}")


if __name__ == "__main__":
    main()
