"""flask commands: create-admin, seed-demo, purge-messages, recount-unread."""
from __future__ import annotations

import click
from flask import Flask, current_app
from sqlalchemy import select

from .extensions import db
from .models import Conversation
from .services import DomainError, transaction
from .services.accounts import make_admin, register_user, sign_up
from .services.conversations import create_group, find_or_create_direct
from .services.messages import send_message
from .services.people import find_user_by_username
from .services.read_state import recount_unread as recount
from .services.retention import purge_expired_messages


def _ask_password() -> str:
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


def register_cli(app: Flask) -> None:
    @app.cli.command("create-admin")
    @click.argument("username")
    @click.option("--password", help="The password (asked for when needed and not given).")
    @click.option("--reset-password", is_flag=True,
                  help="For an existing user: replace their password too (and sign out all their sessions).")
    def create_admin(username: str, password: str | None, reset_password: bool) -> None:
        """Create an admin account, or make an existing account an admin (its password kept unless
        --reset-password)."""
        user = find_user_by_username(username)
        try:
            if user is None:
                user = sign_up(username, password or _ask_password(), is_admin=True)
                click.echo(f"Created admin {user.username}.")
            elif reset_password:
                ended = make_admin(user, password or _ask_password())
                click.echo(f"{user.username} is now an admin with the new password; "
                           f"{ended} signed-in session(s) were signed out.")
            else:
                make_admin(user)
                note = " (--password was ignored: add --reset-password to replace it)" if password else ""
                click.echo(f"{user.username} is now an admin. Their password is unchanged{note}.")
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
