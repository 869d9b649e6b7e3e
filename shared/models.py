"""SQL tables (SQLAlchemy 2 declarative). Alembic migrations in shared/migrations mirror them."""

from __future__ import annotations

import os
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.results import StoredResult
from shared.status import JobStatus, WebhookEventStatus

# Stable constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(dt: datetime) -> datetime:
    """SQLite hands datetimes back naive; everything stored is UTC."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


NULLABLE_JSON = JSON(none_as_null=True)


def partial_index(name: str, *columns: str, where: str, unique: bool = False) -> Index:
    """An index on the rows matching ``where`` (literal SQL, the same on both databases:
    a planner matches it term by term against a query's own literal conditions)."""
    condition = text(where)
    return Index(name, *columns, unique=unique, postgresql_where=condition, sqlite_where=condition)


def new_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Time-ordered, so a new row's primary-key entry lands at the index's right edge, as
    a COPY of 10,000 lines does, instead of on a random page of an index that outgrew
    memory (bench.backlog measures both). Still unguessable (74 random bits); it tells
    when the row was made, which its created_at says anyway. The standard library has
    ``uuid.uuid7`` from Python 3.14; until then these lines, not a dependency.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 used
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 68) << 64  # version, rand_a
    value |= 0b10 << 62 | rand & (2**62 - 1)  # variant, rand_b
    return str(uuid.UUID(int=value))


#: A job's or batch's id, and every column holding one (so joins never mix types): on
#: PostgreSQL its native ``uuid``, 16 bytes where the text was 37 in the row and in each
#: index entry (issue #26); on SQLite the dashed text. Python always sees the dashed
#: lowercase string (``as_uuid=False``; shared.db makes raw SQL read it as text too).
RowId = String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")

_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_row_id(value: str) -> bool:
    """Whether ``value`` is an id as ``new_id`` writes it (dashed, lowercase). Anything
    else names no row on either database: checked before a lookup, because PostgreSQL
    refuses to compare a uuid column with text that is not a uuid (an error, not a
    miss), and accepts forms SQLite would not match (upper case, no dashes)."""
    return _CANONICAL_ID.fullmatch(value) is not None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    # Python None is SQL NULL in JSON columns, whichever path inserts the row (ORM, Core
    # executemany or COPY), not sometimes a JSON 'null'.
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: NULLABLE_JSON}


# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer, "sqlite")


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("tokens >= 0", name="tokens_nonnegative"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(100))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Standard Webhooks signing secrets ("whsec_..."); the previous one stays valid
    # for a while after a rotation, and deliveries are signed with both meanwhile.
    webhook_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    webhook_secret_previous: Mapped[str | None] = mapped_column(String(100), default=None)
    webhook_secret_rotated_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    # sha256 of the whole key: keys are 256-bit random, so a fast hash is safe and a
    # lookup by hash avoids running bcrypt on every request.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


# The rows the batch-charge index holds (as written in migration 0010).
BATCH_CHARGE = "batch_id IS NOT NULL"


class LedgerEntry(Base):
    """Every change of a balance; users.tokens always equals the sum of its entries."""

    __tablename__ = "token_ledger"
    __table_args__ = (
        # A job is charged once and refunded at most once per run (a retried batch line
        # runs again: retry 1, 2, ...), whatever runs twice.
        UniqueConstraint("job_id", "reason", "retry", name="uq_token_ledger_job_reason_retry"),
        # A bulk batch's charge is one row for all its lines (delta -n, no job_id): one per
        # run of the batch (retry: batches.retries of that run), whatever runs twice.
        Index(
            "uq_token_ledger_batch_charge",
            "batch_id",
            "retry",
            unique=True,
            postgresql_where=text(BATCH_CHARGE),
            sqlite_where=text(BATCH_CHARGE),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    delta: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(16))  # signup | charge | refund | refill
    job_id: Mapped[str | None] = mapped_column(RowId, default=None)
    # A bulk charge's batch (no foreign key, like job_id: retention purges batches, the
    # ledger stays). Its lines have no charge row of their own: shared/ledger.py.
    batch_id: Mapped[str | None] = mapped_column(RowId, default=None)
    # The job's run this entry belongs to (jobs.retries when it was written); for a batch's
    # charge, the batch's run (batches.retries once the retry is made).
    retry: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    actor_id: Mapped[int | None] = mapped_column(BigId, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# The partial indexes' conditions, used as written by the dispatcher's queries too
# (shared/dispatch.py): a planner uses a partial index only for a condition it can match.
BULK_WAITING = "status = 'queued' AND batch_id IS NOT NULL AND dispatched_at IS NULL"
BULK_OUT = (
    "status IN ('queued', 'processing') AND batch_id IS NOT NULL AND dispatched_at IS NOT NULL"
)
OPEN_BATCH = "completed_at IS NULL"
PROCESSING = "status = 'processing'"
SINGLE = "batch_id IS NULL"
HAS_CUSTOM_ID = "custom_id IS NOT NULL"


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(RowId, primary_key=True, default=new_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), default=None
    )
    batch_index: Mapped[int | None] = mapped_column(Integer, default=None)
    # The caller's own id for a batch line (JSON Lines input), unique within the batch.
    custom_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # How many times the line was retried (POST /v1/batches/{id}/retry); 0 on its first run.
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # No index on status alone: with a backlog nearly every row is 'queued', and a
    # planner without statistics picked it to AND with the small partial indexes below,
    # reading the whole backlog (0008). Each status question has its own index.
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    model: Mapped[str] = mapped_column(String(100))
    top_k: Mapped[int] = mapped_column(Integer, default=5)
    input_url: Mapped[str | None] = mapped_column(Text, default=None)
    input_filename: Mapped[str | None] = mapped_column(String(255), default=None)
    # Stored compactly, read back in full (shared/results.py).
    result: Mapped[dict[str, Any] | None] = mapped_column(StoredResult(), default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When a worker last took the job; a processing job not finished long after is
    # presumed lost with its worker (see worker/reconciler.py).
    claimed_at: Mapped[datetime | None] = mapped_column(default=None)
    # The worker instance (its heartbeat name) that took the job last: once that
    # heartbeat stops, the job is re-sent at once instead of after STALE_PROCESSING_S.
    claimed_by: Mapped[str | None] = mapped_column(String(200), default=None)
    # Bulk jobs only (shared/dispatch.py): the message the job goes out in (api.bulk.chunk
    # numbers them, keeping a URL's duplicates together), and when that message was sent.
    # A queued bulk job with no dispatched_at waits in SQL for its turn.
    chunk: Mapped[int | None] = mapped_column(Integer, default=None)
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_events: Mapped[list[str] | None] = mapped_column(NULLABLE_JSON, default=None)
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)

    # Listing a user's jobs newest first is the hot read.
    __table_args__ = (
        Index("ix_jobs_user_created", "user_id", "created_at"),
        # Results in input order, and per-batch counts by status.
        Index("ix_jobs_batch_index", "batch_id", "batch_index"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        # Lines without a custom_id never collide, so only those with one are entered:
        # an entry per line of every batch was ~50 bytes a job for nothing (0009).
        partial_index(
            "uq_jobs_batch_custom_id", "batch_id", "custom_id", where=HAS_CUSTOM_ID, unique=True
        ),
        # Retention finds old finished single jobs without a scan; batch lines go with
        # their batch, so they have no entry here (0009).
        partial_index("ix_jobs_single_completed", "completed_at", where=SINGLE),
        # The dispatcher's two questions stay cheap with millions of jobs waiting: a
        # batch's next chunk, and how many bulk jobs are out (a few batches' worth).
        partial_index("ix_jobs_bulk_waiting", "batch_id", "chunk", where=BULK_WAITING),
        partial_index("ix_jobs_bulk_out", "user_id", where=BULK_OUT),
        # The reconciler's lost-job check: the jobs being processed, a few batches' worth.
        partial_index("ix_jobs_processing", "claimed_at", where=PROCESSING),
    )


class Batch(Base):
    """A bulk submission: N URL jobs charged together. Counts are derived from its jobs."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_user_created", "user_id", "created_at"),
        Index("ix_batches_completed_at", "completed_at"),  # retention
        # The dispatcher looks for work among the batches not yet completed.
        partial_index("ix_batches_open", "created_at", where=OPEN_BATCH),
    )

    id: Mapped[str] = mapped_column(RowId, primary_key=True, default=new_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    total: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(100))
    top_k: Mapped[int] = mapped_column(Integer, default=5)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    canceled_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set once per run, by whoever ends the last job; batch.completed is sent exactly
    # then. A retry clears it, and the retried lines' end sets it (and sends) again.
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    # How many retries reopened the batch; its batch.completed events are keyed by it.
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the dispatcher last sent one of its chunks: of two users with as many jobs
    # out, the one served less recently goes first (shared/dispatch.py).
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookEvent(Base):
    """One event to deliver; its id is the ``webhook-id`` header, kept across retries."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        UniqueConstraint("job_id", "event_type", name="uq_webhook_events_job_type"),
        UniqueConstraint(
            "batch_id", "event_type", "batch_retry", name="uq_webhook_events_batch_type_retry"
        ),
        Index("ix_webhook_events_due", "status", "next_attempt_at"),
        Index("ix_webhook_events_completed_at", "completed_at"),  # retention
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(RowId, default=None)
    batch_id: Mapped[str | None] = mapped_column(RowId, default=None)
    # batches.retries when recorded: a retried batch completes (and notifies) once more.
    batch_retry: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    event_type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default=WebhookEventStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    locked_until: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookAttempt(Base):
    """Every delivery attempt, as the receiver answered it."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(Base):
    """The first response to a charging POST, replayed for a repeat of the same key."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_key"),
        Index("ix_idempotency_keys_created_at", "created_at"),  # retention
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Counter(Base):
    """Jobs by status and tokens by ledger reason, kept by the database's triggers
    (migration 0009) as rows change: a label's value is the sum of its rows' ``n``.

    On PostgreSQL each statement that changes jobs or the ledger adds signed delta rows,
    and ``imgclf_counters_fold()`` folds them into one row per label; on SQLite there is
    one row per label (a unique index there). Never written by the application.
    """

    __tablename__ = "counters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    metric: Mapped[str] = mapped_column(String(16))  # jobs | tokens
    label: Mapped[str] = mapped_column(String(32))  # a job status, or a ledger reason
    n: Mapped[int] = mapped_column(BigInteger)
