"""SQLite: users and conversations never reuse an id (AUTOINCREMENT), as messages already did.

Without it SQLite hands the largest id out again once its row is deleted. A session names its
user by id, so a deleted account's cookie named the next account registered; a page left open on
a deleted conversation received the next conversation's messages. PostgreSQL's sequences never
reuse an id: nothing to do there.

Ids freed before this migration (above the largest id left) can still be handed out once more.

Revision ID: 0004_sqlite_ids_never_reused
Revises: 0003_send_function
Create Date: 2026-11-27 17:35:00

"""
import warnings

from alembic import op


revision = "0004_sqlite_ids_never_reused"
down_revision = "0003_send_function"
branch_labels = None
depends_on = None


def _rebuild(autoincrement: bool) -> None:
    # Rebuilt by copying (migrations/env.py turns foreign keys off for it). Reflection skips
    # the expression index on lower(username): it is made again after the copy.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based index")
        for table in ("users", "conversations"):
            with op.batch_alter_table(table, recreate="always",
                                      table_kwargs={"sqlite_autoincrement": autoincrement}):
                pass
    op.execute("CREATE UNIQUE INDEX IF NOT EXISTS ux_users_username_lower ON users (lower(username))")


def upgrade():
    if op.get_bind().dialect.name == "sqlite":
        _rebuild(True)


def downgrade():
    if op.get_bind().dialect.name == "sqlite":
        _rebuild(False)
