"""backlog indexes: a partial index for processing jobs replaces the index on status

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 10:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# As in shared/models.py (a migration must not import the models: they move on).
PROCESSING = "status = 'processing'"


def upgrade() -> None:
    # With a million jobs waiting, nearly every row is 'queued': the index on status
    # alone answered no question cheaply, and a planner without statistics ANDed it
    # with the small partial indexes, reading the whole backlog.
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.create_index(
        "ix_jobs_processing",
        "jobs",
        ["claimed_at"],
        postgresql_where=sa.text(PROCESSING),
        sqlite_where=sa.text(PROCESSING),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_processing", table_name="jobs")
    op.create_index("ix_jobs_status", "jobs", ["status"])
