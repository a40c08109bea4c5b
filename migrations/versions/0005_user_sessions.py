"""Signed-in sessions kept in the database: user_sessions.

Every signed-in cookie (the Flask session and the "keep me signed in" cookie) now names one row
by a secret token whose SHA-256 is stored here; signing out, "sign out other sessions", a password
change and account deletion delete rows, so a copied or remembered cookie stops working for
good, whether or not Redis kept anything (the sign-outs used to live only in Redis).

Cookies issued before this migration name no row: everyone signs in once more after it.

Revision ID: 0005_user_sessions
Revises: 0004_sqlite_ids_never_reused
Create Date: 2026-12-05 19:00:00

"""
import sqlalchemy as sa
from alembic import op


revision = "0005_user_sessions"
down_revision = "0004_sqlite_ids_never_reused"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "user_sessions",
        sa.Column("id", sa.String(length=24), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        # Deleting an account deletes its sessions with it.
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        # Each signed-in request looks its session up by the token's hash.
        sa.UniqueConstraint("token_hash", name="uq_user_sessions_token_hash"),
    )
    op.create_index("ix_user_sessions_user_id", "user_sessions", ["user_id"])


def downgrade():
    op.drop_index("ix_user_sessions_user_id", table_name="user_sessions")
    op.drop_table("user_sessions")
