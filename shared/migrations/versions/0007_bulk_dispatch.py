"""bulk dispatch: jobs.chunk, jobs/batches.dispatched_at and the dispatcher's partial indexes

Revision ID: 0007
Revises: 0004
Create Date: 2026-11-30 08:15:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# As in shared/models.py (a migration must not import the models: they move on).
BULK_WAITING = "status = 'queued' AND batch_id IS NOT NULL AND dispatched_at IS NULL"
BULK_OUT = (
    "status IN ('queued', 'processing') AND batch_id IS NOT NULL AND dispatched_at IS NOT NULL"
)
OPEN_BATCH = "completed_at IS NULL"


def upgrade() -> None:
    # Batch mode: SQLite rebuilds the table; PostgreSQL just adds the columns.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chunk", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    # Active bulk jobs of the previous release were all sent at submission: mark them
    # dispatched, so the dispatcher never sends them again (and the reconciler re-sends
    # them, as before, if their message was lost).
    op.execute(
        "UPDATE jobs SET dispatched_at = created_at "
        "WHERE batch_id IS NOT NULL AND status IN ('queued', 'processing')"
    )
    for name, table, columns, where in (
        ("ix_jobs_bulk_waiting", "jobs", ["batch_id", "chunk"], BULK_WAITING),
        ("ix_jobs_bulk_out", "jobs", ["user_id"], BULK_OUT),
        ("ix_batches_open", "batches", ["created_at"], OPEN_BATCH),
    ):
        op.create_index(
            name,
            table,
            columns,
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
        )


def downgrade() -> None:
    op.drop_index("ix_batches_open", table_name="batches")
    op.drop_index("ix_jobs_bulk_out", table_name="jobs")
    op.drop_index("ix_jobs_bulk_waiting", table_name="jobs")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("dispatched_at")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("dispatched_at")
        batch_op.drop_column("chunk")
