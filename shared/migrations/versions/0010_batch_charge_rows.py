"""one ledger row per bulk charge: token_ledger.batch_id

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 17:00:00.000000

A bulk batch's charge (and a retry of its failed lines) was one ``charge`` row per
line, about 200 bytes of a finished line's storage (issue #26). It is now one row for
the whole charge: ``delta`` -n, ``job_id`` NULL, ``batch_id`` the batch, ``retry`` the
batch's run. Refunds stay one row per line and run. Single jobs keep their charge row.

History is not rewritten: the per-line charge rows of batches accepted before this
migration stay valid (a cancel voids whichever rows the lines have, shared/ledger.py),
and the counters (0009) sum ``delta`` by reason, so one row of -n counts as n rows of -1.

Plain ALTER TABLE, no batch mode: on SQLite a batch-mode copy of ``token_ledger``
would drop 0009's counters triggers with the old table.

Downgrade drops the column and its index, but refuses while a batch charged with one
row still has lines the previous release could withdraw (queued, never sent, first
run): its cancel looks for per-line charge rows, finds none, and would keep the
tokens. Wait until those batches are sent or ended, or cancel them first.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# As in shared/models.py (a migration must not import the models: they move on).
BATCH_CHARGE = "batch_id IS NOT NULL"
INDEX = "uq_token_ledger_batch_charge"


def upgrade() -> None:
    op.add_column("token_ledger", sa.Column("batch_id", sa.String(36), nullable=True))
    op.create_index(
        INDEX,
        "token_ledger",
        ["batch_id", "retry"],
        unique=True,
        postgresql_where=sa.text(BATCH_CHARGE),
        sqlite_where=sa.text(BATCH_CHARGE),
    )


# Batches charged by one row whose lines the previous release's cancel would withdraw.
WITHDRAWABLE = (
    "SELECT DISTINCT l.batch_id FROM token_ledger l JOIN jobs j ON j.batch_id = l.batch_id"
    " WHERE l.batch_id IS NOT NULL AND l.reason = 'charge' AND j.status = 'queued'"
    " AND j.dispatched_at IS NULL AND j.retries = 0"
)


def downgrade() -> None:
    waiting = op.get_bind().execute(sa.text(WITHDRAWABLE + " LIMIT 5")).scalars().all()
    if waiting:
        raise RuntimeError(
            "Refusing to downgrade below 0010: batch(es) "
            f"{', '.join(waiting)} were charged with one ledger row and still have lines "
            "waiting unsent; the previous release's cancel would find no per-line charge "
            "rows to void and keep their tokens. Wait until they are sent or ended (or "
            "cancel them), then downgrade again. Rows already written keep their delta: "
            "balances stay the sum of the ledger."
        )
    op.drop_index(INDEX, table_name="token_ledger")
    op.drop_column("token_ledger", "batch_id")
