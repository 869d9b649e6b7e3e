"""Gunicorn settings for the API: ``gunicorn -c gunicorn.conf.py 'api.wsgi:app'``.

gunicorn's threaded workers give each connection a thread while it reads the request,
with no time limit on a slow header or body: in production gunicorn is never reached
directly, only through nginx (deploy/nginx.conf, docs/deploy.md "The front proxy"),
which reads whole requests first.

This file configures gunicorn, the HTTP server, not the service. The application
reads its settings only through shared/config.py (the variables in the README's
table); the variables read here are gunicorn's own knobs and are not
application settings:

    HOST             address to listen on (default 0.0.0.0; `make run` uses 127.0.0.1)
    PORT             port to listen on (default 5000, as the README and make run use)
    WEB_CONCURRENCY  worker processes (default: one per CPU, at least 2, at most 4)
    API_THREADS      threads per worker process (default 32)

``PROMETHEUS_MULTIPROC_DIR`` (read by prometheus-client, README) is honoured too:
with several worker processes /metrics sums their request metrics from files in
that directory, so it is created and emptied here when gunicorn starts, and a
dead worker's files are marked as such.

Anything else can be overridden without editing this file through gunicorn's
own ``GUNICORN_CMD_ARGS`` (e.g. ``GUNICORN_CMD_ARGS="--keep-alive 75"`` behind
a load balancer whose idle timeout is 60 s), or on the command line.

The request timeout and log level follow the service's own settings
(``MAX_WAIT_S``, ``LOG_LEVEL``), read through ``Config.from_env()`` so the one
place that reads the application's environment stays shared/config.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import gunicorn.util

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shared.config import Config  # (found through the path above)

_config = Config.from_env()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours cpusets (docker --cpuset-cpus)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


wsgi_app = "api.wsgi:app"  # the default; a command-line app argument wins
# HOST: 0.0.0.0 (every interface) suits a container; `make run` passes 127.0.0.1.
bind = f"{os.environ.get('HOST') or '0.0.0.0'}:{_int_env('PORT', 5000)}"

# Threaded workers: a long-poll (GET /v1/jobs/{id}?wait=N, Prefer: wait=N) holds a
# thread for up to MAX_WAIT_S seconds while waiting on Redis, using no CPU. At most
# MAX_WAITS_PER_PROCESS threads wait at once (api/waits.py); the rest serve requests
# (checked in on_starting, so that a command-line --threads is checked too).
worker_class = "gthread"
threads = _int_env("API_THREADS", 32)

# One process per core, at least 2 (one restarting never leaves none), at most 4:
# every process has its own SQLAlchemy pool (up to 10 + 20 PostgreSQL connections).
# The classic 2 x cores + 1 is for sync workers, one request at a time each; these have
# 32 threads, and on 2 cores 2 processes cost about 15 % less CPU per submission than
# 4 did, API and worker alike (bench.bookkeeping, docs/benchmarks.md, session 12).
workers = _int_env("WEB_CONCURRENCY", max(2, min(_cpus(), 4)))

# A worker process whose main loop stalls this long is killed and replaced; keep it
# well above the longest long-poll (MAX_WAIT_S, 60 s by default -> 90 s).
timeout = max(90, _config.max_wait_s + 30)
# On SIGTERM, requests in flight get this long to finish (long-polls longer than
# that are cut; clients poll again).
graceful_timeout = 30
keepalive = 5

# Heartbeat files on tmpfs: a container's overlay filesystem can stall them.
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"

# Logs to stdout/stderr, for docker logs / journald.
accesslog = "-"
errorlog = "-"
loglevel = _config.log_level.lower()


def on_starting(server) -> None:
    _check_threads_outnumber_waits(server.cfg.threads)
    _empty_metrics_dir()
    gunicorn.util.write_error = _write_json_error  # before the workers fork


# gunicorn answers some requests itself, before the app sees them: a request line over
# limit_request_line (4094 bytes: 414), over limit_request_fields headers or
# limit_request_field_size bytes in one (431), a malformed request (400). It writes them
# as HTML through gunicorn.util.write_error, for which it has no setting or hook; this
# replaces it so that they come in the service's JSON error format too (docs/api.md).
SERVER_ERROR_CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    501: "not_implemented",
}
SERVER_ERROR_HINTS = {
    414: "The request line is longer than the server's limit_request_line; send long "
    "input in the body (many URLs: POST /v1/batches).",
    431: "Too many or too large request headers (the server's limit_request_fields, "
    "limit_request_field_size).",
}


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    message = SERVER_ERROR_HINTS.get(status_int) or mesg or "An internal error occurred."
    body = json.dumps(
        {
            "error": {
                "code": SERVER_ERROR_CODES.get(status_int, "internal_error"),
                "message": message,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


def _check_threads_outnumber_waits(threads: int) -> None:
    """Refuse a thread count that long-polls alone could fill: nothing else would be served."""
    waits = _config.max_waits_per_process
    if threads <= waits:
        raise SystemExit(
            f"gunicorn: threads per process ({threads}) must exceed MAX_WAITS_PER_PROCESS "
            f"({waits}): raise API_THREADS (--threads) or lower MAX_WAITS_PER_PROCESS"
        )


def _empty_metrics_dir() -> None:
    """Start every run with an empty prometheus-client multiprocess directory."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def post_worker_init(worker) -> None:
    """On any stop signal, answer the long polls in flight at once (see DoneListener.close).

    Otherwise a stop waits for them (up to MAX_WAIT_S) past ``graceful_timeout``,
    and gunicorn SIGKILLs the worker and logs "Perhaps out of memory?".
    gunicorn has a hook for SIGINT and SIGQUIT (``worker_int``) but none for
    SIGTERM, so its handlers are wrapped here, after it installed them.
    """
    quitting = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(sig)
        if callable(previous):
            signal.signal(sig, _ending_waits(worker, previous, quitting))


def _ending_waits(worker, previous, quitting: threading.Event):
    def handler(signum, frame) -> None:
        # Ctrl-C reaches the worker twice: SIGINT from the terminal, then SIGQUIT from
        # the master. gunicorn's quit handler holds the thread pool's shutdown lock;
        # the second signal, run inside the first handler, would wait for that lock
        # forever, and the master SIGKILLs the worker. One quit is enough.
        if quitting.is_set():
            return
        if signum != signal.SIGTERM:  # SIGTERM only starts a graceful stop: a quit may follow
            quitting.set()
        services = getattr(worker.wsgi, "extensions", {}).get("imgclf")
        if services is not None:
            services.done.close()
        previous(signum, frame)

    return handler


def child_exit(server, worker) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
