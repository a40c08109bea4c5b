"""flask commands: create-admin, seed-demo, purge-messages, recount-unread."""
from __future__ import annotations

import click
from flask import Flask, current_app
from sqlalchemy import select

from .extensions import db
from .models import Conversation
from .services import DomainError, transaction
from .services.accounts import hash_password, register_user
from .services.conversations import create_group, find_or_create_direct
from .services.messages import send_message
from .services.people import find_user_by_username
from .services.read_state import recount_unread as recount
from .services.retention import purge_expired_messages


def register_cli(app: Flask) -> None:
    @app.cli.command("create-admin")
    @click.argument("username")
    @click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
    def create_admin(username: str, password: str) -> None:
        """Create an admin account, or make an existing account an admin."""
        user = find_user_by_username(username)
        try:
            if user is None:
                user = register_user(username, password, is_admin=True)
                click.echo(f"Created admin {user.username}.")
            else:
                if len(password) < 8:
                    raise DomainError("Passwords need at least 8 characters.")
                user.is_admin = True
                user.is_disabled = False
                user.password_hash = hash_password(password)
                db.session.commit()
                click.echo(f"{user.username} is now an admin.")
        except DomainError as exc:
            raise click.ClickException(str(exc.message))

    @app.cli.command("seed-demo")
    def seed_demo() -> None:
        """Add demo users (password 'password123') and a few conversations."""
        people = [("alice", "Alice"), ("bob", "Bob"), ("carol", "Carol"), ("dave", "Dave")]
        users = []
        for username, name in people:
            user = find_user_by_username(username) or register_user(username, "password123", name)
            users.append(user)
        alice, bob, carol, dave = users
        direct = find_or_create_direct(alice, bob)
        if direct.last_message_id is None:
            send_message(alice, direct, "Hi Bob! Welcome to webchat.")
            send_message(bob, direct, "Hi Alice 👋")
        exists = db.session.scalar(select(Conversation.id).where(
            Conversation.is_group.is_(True), Conversation.name == "Demo group", Conversation.owner_id == alice.id))
        if exists is None:
            group = create_group(alice, "Demo group", [bob.id, carol.id, dave.id])
            send_message(carol, group, "Hello everyone")
        click.echo("Demo users: alice, bob, carol, dave (password: password123)")

    @app.cli.command("purge-messages")
    @click.option("--days", type=int, default=None, help="Delete messages older than this many days.")
    def purge_messages(days: int | None) -> None:
        """Run the retention purge now and print what it deleted."""
        days = current_app.config["RETENTION_DAYS"] if days is None else days
        if days < 1:
            raise click.BadParameter("must be 1 or more", param_hint="--days")
        result = purge_expired_messages(days, trigger="cli")
        if result is None:
            raise click.ClickException("Another purge is running; try again later.")
        click.echo(f"Deleted {result.messages} messages and {result.images} images "
                   f"in {result.conversations} conversations ({result.batches} batches, {result.seconds:.2f}s).")

    @app.cli.command("recount-unread")
    def recount_unread() -> None:
        """Rebuild every unread counter from the messages (after loading messages around the app)."""
        with transaction():
            recount()
        click.echo("Unread counters rebuilt from the messages.")
