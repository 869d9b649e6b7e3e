"""Database migrations: ``python -m shared.migrate [upgrade|current|revision -m MSG]``.

The run command calls ``upgrade`` automatically; in production run it once
before rolling out API and worker processes (docs/deploy.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig

from shared.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(config: Config) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation treats '%' specially (URL-encoded passwords).
    cfg.set_main_option("sqlalchemy.url", config.database_url.replace("%", "%%"))
    return cfg


def upgrade(config: Config, revision: str = "head") -> None:
    _ensure_sqlite_dir(config.database_url)
    command.upgrade(alembic_config(config), revision)


def _ensure_sqlite_dir(url: str) -> None:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:":
        Path(url[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)


def main(argv: list[str]) -> int:
    config = Config.from_env()
    action = argv[0] if argv else "upgrade"
    if action == "upgrade":
        upgrade(config, argv[1] if len(argv) > 1 else "head")
    elif action == "current":
        command.current(alembic_config(config), verbose=True)
    elif action == "revision":
        message = argv[argv.index("-m") + 1] if "-m" in argv else "change"
        command.revision(alembic_config(config), message=message, autogenerate=True)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
