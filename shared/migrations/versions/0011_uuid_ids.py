"""job and batch ids as PostgreSQL uuid

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 20:00:00.000000

Job and batch ids were ``varchar(36)``: 37 bytes in the row and in every index entry
that holds one, where PostgreSQL's ``uuid`` takes 16 (issue #26). Every column that
holds one changes, so joins and comparisons never mix the two types: ``jobs.id``,
``jobs.batch_id``, ``batches.id``, ``token_ledger.job_id``/``batch_id`` and
``webhook_events.job_id``/``batch_id``. The application still sees the dashed text
(shared.models.RowId).

Each table is rewritten once (one ALTER TABLE for all its columns) with its indexes,
under an exclusive lock. The previous release's code does not work on the new types
(it reads ``uuid.UUID`` objects where it expects text, and binds id lists as
``varchar[]``): stop the API and workers before it runs, start the new release after.
The foreign key from jobs to batches is dropped and made again around the change,
since its two ends cannot change type one at a time.

A value that is not a uuid cannot be converted: the upgrade refuses, naming a few,
before changing anything. Only ``shared.models.new_id`` (and uuid4 before it) ever
wrote these columns, so a production database has none.

SQLite keeps the text: nothing to do there.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

COLUMNS = {
    "batches": ("id",),
    "jobs": ("id", "batch_id"),
    "token_ledger": ("job_id", "batch_id"),
    "webhook_events": ("job_id", "batch_id"),
}
FOREIGN_KEY = "fk_jobs_batch_id_batches"
# The forms PostgreSQL's uuid input takes (without braces, which nothing here wrote).
UUID_PATTERN = "^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _refuse_non_uuids()
    _change("uuid", "{}::uuid")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _change("varchar(36)", "{}::text")


def _change(sql_type: str, using: str) -> None:
    op.drop_constraint(FOREIGN_KEY, "jobs", type_="foreignkey")
    for table, columns in COLUMNS.items():
        changes = ", ".join(
            f"ALTER COLUMN {c} TYPE {sql_type} USING {using.format(c)}" for c in columns
        )
        op.execute(f"ALTER TABLE {table} {changes}")
    op.create_foreign_key(FOREIGN_KEY, "jobs", "batches", ["batch_id"], ["id"], ondelete="CASCADE")


def _refuse_non_uuids() -> None:
    bad = []
    for table, columns in COLUMNS.items():
        for column in columns:
            found = op.get_bind().execute(
                text(f"SELECT {column} FROM {table} WHERE {column} !~ :pattern LIMIT 5"),
                {"pattern": UUID_PATTERN},
            )
            bad += [f"{table}.{column} {value!r}" for value in found.scalars()]
    if bad:
        raise RuntimeError(
            "Refusing to upgrade to 0011: these ids are not uuids and cannot become one: "
            f"{', '.join(bad[:10])}. Nothing was changed."
        )
