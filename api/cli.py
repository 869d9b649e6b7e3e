"""Operator commands: ``flask --app api create-admin`` and ``flask --app api db-upgrade``."""

from __future__ import annotations

import click
from flask import Flask
from sqlalchemy import select, update

from api.auth import hash_password, new_api_key, validate_password
from api.services import db, services
from shared import ledger, migrate
from shared.models import User


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
        session = db()
        user = session.scalars(select(User).where(User.username == username)).first()
        if user is not None:
            session.execute(update(User).where(User.id == user.id).values(is_admin=True))
            session.commit()
            click.echo(f"{username} is now an administrator")
            return
        validate_password(password)
        user = User(username=username, password_hash=hash_password(password), is_admin=True)
        session.add(user)
        session.flush()
        ledger.grant(session, user.id, services().config.signup_tokens, ledger.SIGNUP)
        row, key = new_api_key(user.id, name="admin")
        session.add(row)
        session.commit()
        click.echo(f"created administrator {username}; API key (shown once): {key}")
