"""batch retries and per-line custom ids

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 08:30:00.000000

A retried batch line is the same job row, run again: ``jobs.retries`` counts its
runs after the first, and every ledger entry and ``batch.completed`` event names the
run it belongs to, so the unique keys still say "charged once, refunded at most
once" per run.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), nullable=False, server_default="0")


def upgrade() -> None:
    # Batch mode: SQLite rebuilds each table; PostgreSQL alters it in place.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("custom_id", sa.String(length=64), nullable=True))
        batch_op.add_column(_counter("retries"))
        # NULLs are distinct on both backends: lines without a custom_id never collide.
        batch_op.create_index("uq_jobs_batch_custom_id", ["batch_id", "custom_id"], unique=True)
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(_counter("retries"))
    with op.batch_alter_table("token_ledger", schema=None) as batch_op:
        batch_op.add_column(_counter("retry"))
        batch_op.drop_constraint("uq_token_ledger_job_reason", type_="unique")
        batch_op.create_unique_constraint(
            "uq_token_ledger_job_reason_retry", ["job_id", "reason", "retry"]
        )
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.add_column(_counter("batch_retry"))
        batch_op.drop_constraint("uq_webhook_events_batch_type", type_="unique")
        batch_op.create_unique_constraint(
            "uq_webhook_events_batch_type_retry", ["batch_id", "event_type", "batch_retry"]
        )


def downgrade() -> None:
    # Later runs' batch.completed events do not fit the old unique key; they go. Ledger
    # rows of retried lines are money, never deleted: with any, the downgrade fails.
    op.execute("DELETE FROM webhook_events WHERE batch_retry > 0")
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.drop_constraint("uq_webhook_events_batch_type_retry", type_="unique")
        batch_op.create_unique_constraint(
            "uq_webhook_events_batch_type", ["batch_id", "event_type"]
        )
        batch_op.drop_column("batch_retry")
    with op.batch_alter_table("token_ledger", schema=None) as batch_op:
        batch_op.drop_constraint("uq_token_ledger_job_reason_retry", type_="unique")
        batch_op.create_unique_constraint("uq_token_ledger_job_reason", ["job_id", "reason"])
        batch_op.drop_column("retry")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("retries")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("uq_jobs_batch_custom_id")
        batch_op.drop_column("retries")
        batch_op.drop_column("custom_id")
