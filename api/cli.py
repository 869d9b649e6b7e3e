"""Operator commands: ``flask --app api create-admin`` and ``flask --app api db-upgrade``."""

from __future__ import annotations

import click
from flask import Flask

from api import accounts
from api.services import services
from shared import migrate


def register_cli(app: Flask) -> None:
    @app.cli.command("db-upgrade")
    def db_upgrade() -> None:
        """Apply all database migrations."""
        migrate.upgrade(services().config)
        click.echo("database is up to date")

    @app.cli.command("create-admin")
    @click.argument("username")
    @click.password_option(help="Prompted for when not given (never a default).")
    def create_admin(username: str, password: str) -> None:
        """Create an administrator, or promote an existing user (password unchanged)."""
        if accounts.promote(username):
            click.echo(f"{username} is now an administrator")
            return
        _user, _row, key = accounts.create_user(username, password, admin=True)
        click.echo(f"created administrator {username}; API key (shown once): {key}")
