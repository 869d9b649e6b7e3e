"""retention indexes

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-30 08:30:00.000000

The purge (worker/retention.py) finds old finished rows by these columns. The
ledger's job_id never was a foreign key, so a ledger row keeps its job id when
the job is purged: nothing to change there.
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEXES = (
    ("jobs", "ix_jobs_batch_completed", ["batch_id", "completed_at"]),
    ("batches", "ix_batches_completed_at", ["completed_at"]),
    ("webhook_events", "ix_webhook_events_completed_at", ["completed_at"]),
    ("idempotency_keys", "ix_idempotency_keys_created_at", ["created_at"]),
)


def upgrade() -> None:
    for table, name, columns in INDEXES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(name, columns, unique=False)


def downgrade() -> None:
    for table, name, _columns in reversed(INDEXES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(name)
