"""The one place that reads the environment.

``Config.from_env()`` builds an immutable settings object from environment
variables; the API (``api.create_app``) and the workers
(``worker.celery_app.create_app``, ``worker.webhook_app.create_app``) are all built
from it, so one set of variables configures the whole service. Entry points call
``from_env`` (``api.wsgi``, the celery command's module-level ``app``, the command-line
mains), never an import; tests build each app from a Config of their own. Every
variable is listed, with its default, in the README's configuration table.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

_TRUE = {"1", "true", "yes", "on"}


def _bool(raw: str) -> bool:
    return raw.strip().lower() in _TRUE


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class Config:
    # Storage and messaging
    database_url: str = "sqlite:///var/imgclf.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str = ""  # empty: same as redis_url; amqp://... for RabbitMQ
    # RabbitMQ quorum queues drop a message delivered this many times (a poison message).
    broker_delivery_limit: int = 10
    queue_prefix: str = "imgclf"

    # Accounts and tokens
    # Signs the web pages' session cookies; every API process must share it.
    # Empty: a random key per process (fine for one process; sessions end on restart).
    secret_key: str = ""
    session_cookie_secure: bool = False  # set to 1 behind HTTPS
    # Reverse proxies in front of the API whose X-Forwarded-For to trust (0: none).
    trusted_proxies: int = 0
    signup_tokens: int = 5
    # Rate limits, in the ``limits`` notation ("N per second|minute|hour", "N/5minutes").
    rate_limit_submit: str = "20/second"
    # Bulk lines (batch lines and retried lines) accepted per user: a cancel refunds, so
    # without it a submit-and-cancel loop writes rows for free (at least MAX_BATCH_URLS).
    rate_limit_bulk_lines: str = "20000/minute"
    # DELETE /v1/jobs/{id} and /v1/batches/{id} per user: free, and a batch is many rows.
    rate_limit_delete: str = "20/second"
    login_failure_limit: str = "10/5minutes"
    login_failure_limit_per_ip: str = "100/5minutes"
    # Accounts created per client address (each comes with SIGNUP_TOKENS free tokens).
    signup_limit_per_ip: str = "10/hour"
    bcrypt_rounds: int = 12
    # GET /metrics answers a request with 'Authorization: Bearer <METRICS_TOKEN>'; empty:
    # only unproxied requests from this machine (api/metrics.py).
    metrics_token: str = ""
    # A Bearer key that passed the SQL lookup is trusted this long per API process
    # (api/auth.py KeyCache): a revoke reaches the other API processes within it. 0: off.
    api_key_cache_s: float = 5.0
    idempotency_ttl_s: int = 24 * 3600

    # Jobs
    default_model: str = "mobilenet"
    models: tuple[str, ...] = ("mobilenet",)
    # Trained models (the training pipeline's output) are served from here by name.
    model_dir: str = "var/models"
    default_top_k: int = 5
    max_wait_s: int = 60
    # Long-polls held at once: per user (counted in Redis across API processes) and
    # per API process (so waits never take every gunicorn thread). Past either cap
    # a wait is answered at once with the job as it is.
    max_waits_per_user: int = 10
    max_waits_per_process: int = 16
    upload_ttl_s: int = 3600
    job_max_attempts: int = 3

    # Bulk batches and webhooks
    max_batch_urls: int = 10_000
    webhook_timeout_s: float = 10.0
    # Delay before each delivery attempt: now, 5 s, 30 s, 2 min, 10 min, 1 h, 6 h.
    webhook_backoff_s: tuple[str, ...] = ("0", "5", "30", "120", "600", "3600", "21600")
    webhook_secret_grace_s: int = 24 * 3600

    # Images and fetching
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0
    fetch_max_redirects: int = 3
    allow_private_urls: bool = False

    # Worker batching
    batch_max: int = 32
    batch_wait_ms: int = 0  # 0: a job reaching an idle worker is dispatched at once
    worker_pool: str = "threads"  # threads: one model per process; prefork: one per child
    worker_concurrency: int = 2  # batches in flight (threads) or pool processes (prefork)
    worker_prefetch: int = 0  # 0: 2 * batch_max per pool process
    # Bulk chunks of BATCH_MAX sent to the broker at once, per live worker (shared/dispatch.py);
    # the rest wait in SQL and go out round-robin over users. 0: WORKER_CONCURRENCY + 1.
    bulk_window_batches: int = 0
    fetch_threads: int = 16
    # Processes that fetch, decode and resize images for the loader stage, so loading
    # uses every core (worker/loader_pool.py). "auto": from the cores (see
    # effective_loader_processes); 0: loading runs in the worker process's threads.
    loader_processes: str = "auto"
    # Pixels that a worker's concurrent decodes, its loader processes' included, may hold
    # at once (shared/pixel_budget.py).
    decode_budget_pixels: int = 80_000_000
    decode_wait_s: float = 60.0
    visibility_timeout_s: int = 900
    worker_shutdown_timeout_s: float = 60.0
    # The reconciler (worker/reconciler.py) re-sends or ends jobs whose message was lost.
    reconcile_interval_s: float = 5.0
    # A worker whose heartbeat is older than this is dead: its jobs and the messages it
    # held go back to the queue. Workers beat every quarter of it.
    worker_dead_after_s: float = 20.0
    stale_queued_s: int = 300
    stale_processing_s: int = 0  # 0: VISIBILITY_TIMEOUT_S + 120
    # A prefork pool process gets this long to start (it loads the models) before
    # Celery kills it (Celery's worker_proc_alive_timeout, 4 s by default).
    worker_proc_alive_timeout_s: float = 300.0
    # /readyz answers 503 when no classification worker's heartbeat is this recent
    # (workers write one every WORKER_DEAD_AFTER_S / 4); 0: reported, not judged.
    ready_heartbeat_max_age_s: int = 60

    # Retention (worker/retention.py): finished work older than this is purged, the
    # ledger never. Fractions allowed (the soak keeps one minute); 0: keep forever.
    retention_days: float = 30.0
    retention_interval_s: float = 600.0
    retention_chunk: int = 1000  # rows per purge transaction, so no lock is held long

    # Inference runtime (worker/models/runtimes.py): auto, keras or openvino (null: benchmarks).
    runtime: str = "auto"
    # RUNTIME=null answers every image with the same fixed probabilities, and charges for
    # it: allowed only with this set, and only on a local database (benchmarks).
    allow_null_runtime: bool = False
    runtime_cache_dir: str = "var/runtime-cache"  # compiled models and accuracy-gate records
    # OpenVINO's inference threads for the model's forward pass (INFERENCE_NUM_THREADS);
    # 0: OpenVINO's own choice (one per core under its LATENCY hint). Fewer leaves cores
    # to the loaders (docs/deploy.md, "Threads of the runtime").
    runtime_threads: int = 0

    # Operations
    log_level: str = "INFO"
    log_format: str = "text"  # "json": one JSON object per line, for log collectors

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def effective_prefetch(self) -> int:
        """Messages a worker may hold unacknowledged, across its pool processes."""
        return self.worker_prefetch or 2 * self.batch_max * self.worker_concurrency

    @property
    def effective_loader_processes(self) -> int:
        """Loader processes to start: LOADER_PROCESSES; "auto": cores - 1 (one for the model
        process) from AUTO_LOADER_MIN_CORES cores up, else 0 (measured on 2 cores: the
        worker's own threads load as fast, at the same CPU per image, without a process
        of ~120 MB; docs/benchmarks.md, "Loader processes and the null model")."""
        if str(self.loader_processes) != "auto":
            return int(self.loader_processes)
        cores = usable_cores()
        return cores - 1 if cores >= AUTO_LOADER_MIN_CORES else 0

    @property
    def effective_bulk_window_batches(self) -> int:
        # One batch running per slot and one waiting, so a slot that frees never idles.
        return self.bulk_window_batches or self.worker_concurrency + 1

    @property
    def broker_is_redis(self) -> bool:
        # redis://, rediss://, redis+socket:// and sentinel:// are kombu's Redis transport.
        return self.effective_broker_url.startswith(("redis", "sentinel"))

    @property
    def heartbeat_interval_s(self) -> float:
        # Four beats per WORKER_DEAD_AFTER_S: one or two lost writes do not kill a worker.
        return self.worker_dead_after_s / 4

    @property
    def effective_stale_processing_s(self) -> int:
        # Redis redelivers a dead worker's messages after the visibility timeout; only
        # a job still unfinished well after that has really lost its message.
        return self.stale_processing_s or self.visibility_timeout_s + 120

    @property
    def retention_s(self) -> float:
        return self.retention_days * 86400

    @property
    def webhook_schedule(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.webhook_backoff_s)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values).validated()

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> Config:
        if self.default_model not in self.models:
            raise ValueError(f"DEFAULT_MODEL {self.default_model!r} is not in MODELS {self.models}")
        if not 1 <= self.default_top_k <= 20:
            raise ValueError("DEFAULT_TOP_K must be between 1 and 20")
        if self.batch_max < 1 or self.batch_wait_ms < 0:
            raise ValueError("BATCH_MAX must be >= 1 and BATCH_WAIT_MS >= 0")
        if self.max_waits_per_user < 0 or self.max_waits_per_process < 0:
            raise ValueError("MAX_WAITS_PER_USER and MAX_WAITS_PER_PROCESS must be >= 0")
        if self.worker_concurrency < 1:
            raise ValueError("WORKER_CONCURRENCY must be >= 1")
        if self.fetch_threads < 1:
            raise ValueError("FETCH_THREADS must be >= 1")
        if not (str(self.loader_processes) == "auto" or str(self.loader_processes).isdigit()):
            raise ValueError("LOADER_PROCESSES must be auto or a whole number >= 0")
        if self.bulk_window_batches < 0:
            raise ValueError("BULK_WINDOW_BATCHES must be >= 0 (0: WORKER_CONCURRENCY + 1)")
        if self.decode_budget_pixels < self.max_image_pixels or self.decode_wait_s <= 0:
            # Else the API accepts (and charges for) images no worker can ever decode.
            raise ValueError(
                "DECODE_BUDGET_PIXELS must be >= MAX_IMAGE_PIXELS and DECODE_WAIT_S > 0"
            )
        if self.worker_dead_after_s <= 0 or self.reconcile_interval_s <= 0:
            raise ValueError("WORKER_DEAD_AFTER_S and RECONCILE_INTERVAL_S must be > 0")
        if self.retention_days < 0 or self.retention_interval_s <= 0 or self.retention_chunk < 1:
            raise ValueError(
                "RETENTION_DAYS must be >= 0, RETENTION_INTERVAL_S > 0 and RETENTION_CHUNK >= 1"
            )
        if _limit_amount(self.rate_limit_bulk_lines) < self.max_batch_urls:
            raise ValueError("RATE_LIMIT_BULK_LINES must allow at least MAX_BATCH_URLS lines")
        if self.api_key_cache_s < 0:
            raise ValueError("API_KEY_CACHE_S must be >= 0 (0: no key cache)")
        if self.broker_delivery_limit < 1:
            raise ValueError("BROKER_DELIVERY_LIMIT must be >= 1")
        if self.worker_pool not in WORKER_POOLS:
            raise ValueError(f"WORKER_POOL must be one of {', '.join(WORKER_POOLS)}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"RUNTIME must be one of {', '.join(RUNTIMES)}")
        if self.runtime_threads < 0:
            raise ValueError("RUNTIME_THREADS must be >= 0 (0: OpenVINO's own choice)")
        if self.runtime == "null":
            self._check_null_runtime()
        if self.effective_prefetch < 2 * self.batch_max * self.worker_concurrency:
            raise ValueError(
                f"WORKER_PREFETCH={self.effective_prefetch} cannot fill a batch while another "
                f"is in flight: it must be at least 2 * BATCH_MAX * WORKER_CONCURRENCY "
                f"= {2 * self.batch_max * self.worker_concurrency}"
            )
        return self

    def _check_null_runtime(self) -> None:
        """Fixed answers for every image, charged as real ones: never where users are served."""
        if not self.allow_null_runtime:
            raise ValueError(
                "RUNTIME=null is for benchmarks only (every image gets the same fixed answer); "
                "it needs ALLOW_NULL_RUNTIME=1"
            )
        if not is_local_database(self.database_url):
            raise ValueError(
                "RUNTIME=null is for benchmarks only: refused with a DATABASE_URL on another "
                "host (SQLite or PostgreSQL on localhost only)"
            )

    @property
    def null_runtime(self) -> bool:
        return self.runtime == "null"


def is_local_database(url: str) -> bool:
    """SQLite, or a database server on this machine (loopback or a Unix socket)."""
    if url.startswith("sqlite"):
        return True
    parts = urlsplit(url)
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    if socket_dir and not socket_dir.startswith("/"):
        return False  # ?host=<a server>, not a Unix socket directory
    return (parts.hostname or "") in ("", "localhost", "127.0.0.1", "::1")


WORKER_POOLS = ("threads", "prefork", "solo")
# null: fixed probabilities, no weights, instantly; a stand-in for a GPU in benchmarks only.
RUNTIMES = ("auto", "keras", "openvino", "null")
# LOADER_PROCESSES=auto starts loader processes from this many cores up (see above).
AUTO_LOADER_MIN_CORES = 4


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# The ImageNet models the worker knows how to build (worker.models.registry); the API
# names them in errors without importing the worker.
BUILTIN_MODELS = ("mobilenet", "mobilenet_v2", "inception_v3")
# A trained model is the folder MODEL_DIR/<name>/ holding this file (shared.trained_models);
# its name follows this rule (training.export), so it can never walk out of MODEL_DIR.
TRAINED_MODEL_FILE = "model.keras"
TRAINED_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        return _bool(raw)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind.startswith("tuple"):
        return _csv(raw)
    return raw


def _limit_amount(limit: str) -> int:
    """The N of a ``limits`` rate ("N/minute", "N per hour"); 0 if it has none."""
    found = re.match(r"\s*(\d+)", limit)
    return int(found.group(1)) if found else 0
