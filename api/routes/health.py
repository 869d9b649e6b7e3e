"""Liveness and readiness probes."""

from __future__ import annotations

import time

from api import NULL_RUNTIME_NOTE, schemas
from api.metrics import metrics_response
from api.services import services
from api.validation import Blueprint
from shared.queue import heartbeat_key, heartbeats, worker_problems

blp = Blueprint("health", __name__, description="Probes")


@blp.route("/healthz", methods=["GET"])
@blp.doc(security=[])
@blp.response(200, schemas.Health)
def healthz():
    """The process is up (no dependency is checked)."""
    return {"status": "ok", "checks": {}}


@blp.route("/readyz", methods=["GET"])
@blp.doc(security=[])
@blp.response(200, schemas.Health)
@blp.alt_response(503, schema=schemas.Health, description="A dependency is down")
def readyz():
    """The database and Redis answer, and a classification worker that can serve sent a
    recent heartbeat (one whose loader processes cannot start cannot serve)."""
    svc = services()
    checks = {"database": _check(svc.ping_db), "redis": _check(svc.redis.ping)}
    age = _heartbeat_age(svc) if checks["redis"] == "ok" else None
    max_age = svc.config.ready_heartbeat_max_age_s
    if max_age:
        # Accepting jobs that no worker will run only hides an outage behind a queue.
        fresh = age is not None and age <= max_age
        checks["worker"] = "ok" if fresh else f"error: no worker heartbeat in {max_age} s"
        if fresh:
            checks["worker"] = _serving_check(svc, max_age)
    ok = all(v == "ok" for v in checks.values())
    checks["worker_heartbeat_age_s"] = age
    if svc.config.null_runtime:  # ready, but not classifying anything
        checks["runtime"] = NULL_RUNTIME_NOTE
    return {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503


def _heartbeat_age(svc) -> float | None:
    """Seconds since the freshest worker heartbeat (every WORKER_DEAD_AFTER_S / 4)."""
    try:
        beats = svc.redis.hvals(heartbeat_key(svc.config))
    except Exception:  # a probe reports, it never raises
        return None
    return round(time.time() - max(float(b) for b in beats), 1) if beats else None


def _serving_check(svc, max_age: float) -> str:
    """Whether a worker with a fresh heartbeat reports no problem; else their problem."""
    try:
        beats, problems = heartbeats(svc.redis, svc.config), worker_problems(svc.redis, svc.config)
    except Exception as exc:  # a probe reports, it never raises
        return f"error: {type(exc).__name__}"
    now = time.time()
    fresh = [name for name, at in beats.items() if now - at <= max_age]
    if any(name not in problems for name in fresh):
        return "ok"
    return f"error: no worker can serve: {problems[fresh[0]]}" if fresh else "ok"


def _check(probe) -> str:
    try:
        probe()
    except Exception as exc:  # a probe reports, it never raises
        return f"error: {type(exc).__name__}"
    return "ok"


@blp.route("/metrics", methods=["GET"])
@blp.doc(
    # The token when METRICS_TOKEN is set; none for a direct local request otherwise.
    security=[{"metricsToken": []}, {}],
    responses={
        "200": {"description": "Prometheus text format", "content": {"text/plain": {}}},
        "401": {"description": "metrics_token_required: METRICS_TOKEN is set, not sent"},
        "403": {"description": "metrics_forbidden: no METRICS_TOKEN, not a local request"},
    },
)
def prometheus_metrics():
    """Prometheus metrics: requests, jobs, queues, batches, fetches, webhooks, tokens.

    Bearer METRICS_TOKEN; with none set, only unproxied requests from the API's machine."""
    return metrics_response()
