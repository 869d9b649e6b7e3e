"""counters kept by triggers (jobs by status, tokens by reason); leaner jobs indexes

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 09:00:00.000000

``GET /metrics`` counted ``jobs GROUP BY status`` and summed the ledger by reason on
every scrape: 0.2-0.7 s at a million jobs, seconds at ten million. The database now
keeps those numbers as rows change, whoever changes them (the API, the workers,
retention, a cascade from a deleted user, an operator's SQL), and a scrape sums a
table of a few dozen rows (api/metrics.py).

PostgreSQL: statement-level triggers with transition tables, so a 10,000-row COPY
adds one row per status, not 10,000. They only ever INSERT signed deltas: no
transaction waits on another's counter row, and no two can deadlock on them (a
counter row updated in place would be held to commit by every writer of jobs).
``imgclf_counters_fold()`` replaces the deltas by one row per label; /metrics calls
it, and so does one trigger run in 64, so the table stays small without a scrape.
Folders never wait: one holds an advisory lock, the others skip.

SQLite has one writer at a time: row triggers update one row per label in place.
A later migration that copies ``jobs`` or ``token_ledger`` (alembic's batch mode on
SQLite) drops their triggers with the old table and must create them again.

Two indexes of jobs held an entry for every line of every batch and answered nothing
about them (bench.backlog measures the bytes): retention's index on completed_at is
for single jobs only, and the custom-id uniqueness matters only for lines that have
one (NULLs never collide). Both become partial.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# 'imgclf' in ASCII: the advisory lock key only folders take.
FOLD_LOCK = 0x696D67636C66
FOLD_ONE_IN = 64
# As in shared/models.py.
SINGLE = "batch_id IS NULL"
HAS_CUSTOM_ID = "custom_id IS NOT NULL"


def upgrade() -> None:
    _lean_indexes()
    op.create_table(
        "counters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), autoincrement=True),
        sa.Column("metric", sa.String(16), nullable=False),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_counters"),
    )
    if op.get_bind().dialect.name == "postgresql":
        _postgres_triggers()
    else:
        _sqlite_triggers()
    # Backfilled after the triggers exist: on PostgreSQL CREATE TRIGGER locked both
    # tables against writes until this transaction commits, so nothing is missed or
    # counted twice.
    op.execute(
        "INSERT INTO counters (metric, label, n) "
        "SELECT 'jobs', status, count(*) FROM jobs GROUP BY status"
    )
    op.execute(
        "INSERT INTO counters (metric, label, n) "
        "SELECT 'tokens', reason, sum(delta) FROM token_ledger GROUP BY reason"
    )


def _lean_indexes() -> None:
    op.drop_index("ix_jobs_batch_completed", table_name="jobs")
    op.create_index(
        "ix_jobs_single_completed",
        "jobs",
        ["completed_at"],
        postgresql_where=sa.text(SINGLE),
        sqlite_where=sa.text(SINGLE),
    )
    op.drop_index("uq_jobs_batch_custom_id", table_name="jobs")
    op.create_index(
        "uq_jobs_batch_custom_id",
        "jobs",
        ["batch_id", "custom_id"],
        unique=True,
        postgresql_where=sa.text(HAS_CUSTOM_ID),
        sqlite_where=sa.text(HAS_CUSTOM_ID),
    )


# Each statement's net change per label; 'delta' is what a row adds to its label.
_POSTGRES_CHANGES = {
    # (table, metric, label column, what a row adds)
    "jobs": ("jobs", "status", "1"),
    "token_ledger": ("tokens", "reason", "delta"),
}


def _postgres_triggers() -> None:
    op.execute(f"""
        CREATE FUNCTION imgclf_counters_fold() RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            -- One folder at a time, and none waits: the others leave it to the next.
            -- Under a snapshot older than the statement, a fold could see rows another
            -- folder already took: it folds only in READ COMMITTED.
            IF current_setting('transaction_isolation') <> 'read committed'
                    OR NOT pg_try_advisory_xact_lock({FOLD_LOCK}) THEN
                RETURN;
            END IF;
            WITH gone AS (DELETE FROM counters RETURNING metric, label, n)
            INSERT INTO counters (metric, label, n)
            SELECT metric, label, sum(n) FROM gone GROUP BY metric, label;
        END $$
    """)
    for table, (metric, column, value) in _POSTGRES_CHANGES.items():
        changes = {
            "insert": f"SELECT {column} AS label, {value} AS n FROM new_rows",
            "delete": f"SELECT {column} AS label, -({value}) AS n FROM old_rows",
            "update": f"SELECT {column} AS label, {value} AS n FROM new_rows UNION ALL "
            f"SELECT {column}, -({value}) FROM old_rows",
        }
        for event, rows in changes.items():
            name = f"imgclf_count_{table}_{event}"
            op.execute(f"""
                CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO counters (metric, label, n)
                    SELECT '{metric}', label, sum(n) FROM ({rows}) d
                    GROUP BY label HAVING sum(n) <> 0;
                    IF random() < 1.0 / {FOLD_ONE_IN} THEN
                        PERFORM imgclf_counters_fold();
                    END IF;
                    RETURN NULL;
                END $$
            """)
            referencing = {
                "insert": "NEW TABLE AS new_rows",
                "delete": "OLD TABLE AS old_rows",
                "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
            }[event]
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event.upper()} ON {table} "
                f"REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
            )
        # TRUNCATE fires no row or DELETE trigger: it empties the metric too.
        op.execute(f"""
            CREATE FUNCTION imgclf_count_{table}_truncate() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                DELETE FROM counters WHERE metric = '{metric}';
                RETURN NULL;
            END $$
        """)
        op.execute(
            f"CREATE TRIGGER imgclf_count_{table}_truncate AFTER TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION imgclf_count_{table}_truncate()"
        )


def _sqlite_triggers() -> None:
    # One row per label, updated in place (SQLite only: PostgreSQL's rows are deltas).
    op.create_index("uq_counters_metric_label", "counters", ["metric", "label"], unique=True)

    def add(metric: str, label: str, n: str) -> str:
        return (
            f"INSERT INTO counters (metric, label, n) VALUES ('{metric}', {label}, {n}) "
            "ON CONFLICT (metric, label) DO UPDATE SET n = n + excluded.n;"
        )

    triggers = {
        "jobs_insert": ("INSERT ON jobs", add("jobs", "NEW.status", "1")),
        "jobs_delete": ("DELETE ON jobs", add("jobs", "OLD.status", "-1")),
        "jobs_update": (
            "UPDATE OF status ON jobs FOR EACH ROW WHEN OLD.status IS NOT NEW.status",
            add("jobs", "OLD.status", "-1") + add("jobs", "NEW.status", "1"),
        ),
        "token_ledger_insert": (
            "INSERT ON token_ledger",
            add("tokens", "NEW.reason", "NEW.delta"),
        ),
        "token_ledger_delete": (
            "DELETE ON token_ledger",
            add("tokens", "OLD.reason", "-OLD.delta"),
        ),
        "token_ledger_update": (
            "UPDATE OF reason, delta ON token_ledger",
            add("tokens", "OLD.reason", "-OLD.delta") + add("tokens", "NEW.reason", "NEW.delta"),
        ),
    }
    for name, (event, body) in triggers.items():
        each_row = "" if "FOR EACH ROW" in event else " FOR EACH ROW"
        op.execute(f"CREATE TRIGGER imgclf_count_{name} AFTER {event}{each_row} BEGIN {body} END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in _POSTGRES_CHANGES:
            for event in ("insert", "delete", "update", "truncate"):
                name = f"imgclf_count_{table}_{event}"
                op.execute(f"DROP TRIGGER {name} ON {table}")
                op.execute(f"DROP FUNCTION {name}()")
        op.execute("DROP FUNCTION imgclf_counters_fold()")
    else:
        for table in ("jobs", "token_ledger"):
            for event in ("insert", "delete", "update"):
                op.execute(f"DROP TRIGGER imgclf_count_{table}_{event}")
    op.drop_table("counters")
    op.drop_index("uq_jobs_batch_custom_id", table_name="jobs")
    op.create_index("uq_jobs_batch_custom_id", "jobs", ["batch_id", "custom_id"], unique=True)
    op.drop_index("ix_jobs_single_completed", table_name="jobs")
    op.create_index("ix_jobs_batch_completed", "jobs", ["batch_id", "completed_at"])
