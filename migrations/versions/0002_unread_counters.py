"""Unread counters: conversations.text_count and unreads.read_count, filled from the messages.

A member's unread count becomes text_count - read_count instead of a count of the messages
past their pointer, which grew with every unread message of every member on each send.

Revision ID: 0002_unread_counters
Revises: 25332d6c0752
Create Date: 2026-11-27 08:10:00

"""
from alembic import op
import sqlalchemy as sa


revision = "0002_unread_counters"
down_revision = "25332d6c0752"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("conversations", sa.Column("text_count", sa.Integer(), server_default="0", nullable=False))
    op.add_column("unreads", sa.Column("read_count", sa.Integer(), server_default="0", nullable=False))
    op.execute("""
        UPDATE conversations SET text_count = (
            SELECT count(*) FROM messages m WHERE m.conversation_id = conversations.id AND m.kind = 'text')
    """)
    op.execute("""
        UPDATE unreads SET read_count = (
            SELECT count(*) FROM messages m
            WHERE m.conversation_id = unreads.conversation_id AND m.kind = 'text'
              AND (m.id <= unreads.last_read_message_id OR m.sender_id = unreads.user_id))
    """)


def downgrade():
    # Plain DROP COLUMN (SQLite has it since 3.35): a batch copy would drop and recreate
    # conversations, and with foreign keys on, SQLite deletes every row that refers to it.
    op.drop_column("unreads", "read_count")
    op.drop_column("conversations", "text_count")
