"""The real-service harness in the one namespace the tests use: ``support.<name>``.

The helpers live in ``harness/``, one module per concept, shared with ``bench/``; this
module only gathers them, so a test keeps writing ``support.new_user(client)``. Change a
helper in its ``harness`` module, not here.
"""

from __future__ import annotations

from harness.accounts import (
    add_account,
    basic_auth,
    bearer,
    funded_user,
    ledger_sum,
    make_admin,
    new_account,
    new_user,
    refill,
)
from harness.databases import (
    admin_dsn,
    clean_up_session,
    create_postgres_database,
    delete_rabbitmq_queues,
    delete_redis_prefix,
    drop_postgres_database,
    migrated,
    missing_redis_sentinels,
    new_prefix,
    plant_redis_sentinels,
)
from harness.images import (
    jpeg_segment_flood,
    png_16bit_grey,
    png_chunk,
    png_chunk_flood,
    png_header,
)
from harness.photos import GATE_MAX_S, SLOW_S, PhotoServer
from harness.processes import WORKER_START_TIMEOUT_S, WebhookWorkerProcess, WorkerProcess
from harness.services import OUTPUT, POSTGRES_ADMIN_URL, RABBITMQ_URL, REDIS_URL, ROOT
from harness.serving import serving
from harness.stack_config import config_env, test_config
from harness.statements import DriverLog
from harness.waiting import queue_reaches, wait_for

__all__ = [
    "GATE_MAX_S",
    "OUTPUT",
    "POSTGRES_ADMIN_URL",
    "RABBITMQ_URL",
    "REDIS_URL",
    "ROOT",
    "SLOW_S",
    "WORKER_START_TIMEOUT_S",
    "DriverLog",
    "PhotoServer",
    "WebhookWorkerProcess",
    "WorkerProcess",
    "add_account",
    "admin_dsn",
    "basic_auth",
    "bearer",
    "clean_up_session",
    "config_env",
    "create_postgres_database",
    "delete_rabbitmq_queues",
    "delete_redis_prefix",
    "drop_postgres_database",
    "funded_user",
    "jpeg_segment_flood",
    "ledger_sum",
    "make_admin",
    "migrated",
    "missing_redis_sentinels",
    "new_account",
    "new_prefix",
    "new_user",
    "plant_redis_sentinels",
    "png_16bit_grey",
    "png_chunk",
    "png_chunk_flood",
    "png_header",
    "queue_reaches",
    "refill",
    "serving",
    "test_config",
    "wait_for",
]
