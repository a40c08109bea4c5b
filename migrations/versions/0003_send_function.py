"""PostgreSQL: webchat_send(), a whole text send in one call (one round trip, one transaction).

A send used four round trips to PostgreSQL: BEGIN, the send's statement, the members' states and
COMMIT, and it held its conversation's row lock over the last three. Called outside a transaction,
this function is its own transaction: the client waits for one answer, and the row lock lasts
only while the server runs it. SQLite keeps the send in Python (webchat/services/messages.py).

PostgreSQL does not track a function's body as depending on the tables it names: a later
migration that changes a column of messages, conversations, memberships, unreads or users must
recreate this function (CREATE OR REPLACE) in the same migration, or sends fail at their first call.
Downgrading below this revision while the app that calls it runs makes every PostgreSQL send fail.

Revision ID: 0003_send_function
Revises: 0002_unread_counters
Create Date: 2026-11-27 16:50:00

"""
from alembic import op


revision = "0003_send_function"
down_revision = "0002_unread_counters"
branch_labels = None
depends_on = None


# Each statement of a PL/pgSQL function takes its own snapshot (READ COMMITTED), so the members'
# states, read after the conversation's row is locked, count every message committed before this one.
SEND_FUNCTION = """
CREATE FUNCTION webchat_send(
    p_conversation_id integer, p_sender_id integer, p_body text, p_image_id varchar,
    p_client_id varchar, p_created_at timestamptz, p_text varchar, p_image_only boolean)
RETURNS TABLE (
    id bigint, moved_last boolean, moved_read boolean, text_count integer,
    is_group boolean, name varchar, image_id varchar, created_at timestamptz,
    sender_name varchar, sender_avatar varchar, states json)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    target record;
    new_id bigint;
    new_count integer;
    moved boolean;
    read_moved boolean;
BEGIN
    -- The conversation's row first, as every change to its unread counters takes it (see
    -- conversations.lock_conversations): the membership read next, in a newer snapshot, sees any
    -- removal that committed while this waited.
    PERFORM 1 FROM conversations c WHERE c.id = p_conversation_id FOR NO KEY UPDATE;
    -- Only an active member sends: no row back otherwise, and nothing written.
    SELECT c.is_group, c.name, c.image_id, c.created_at, u.name AS sender_name, u.avatar_id AS sender_avatar
      INTO target
      FROM conversations c
      JOIN memberships mb ON mb.conversation_id = c.id AND mb.user_id = p_sender_id
      JOIN users u ON u.id = mb.user_id AND u.is_disabled IS false
     WHERE c.id = p_conversation_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;

    INSERT INTO messages (conversation_id, sender_id, kind, body, image_id, client_id, created_at)
    VALUES (p_conversation_id, p_sender_id, 'text', p_body, p_image_id, p_client_id, p_created_at)
    RETURNING messages.id INTO new_id;

    -- One more text message; the last message moves unless a larger id committed first (ids
    -- never go backwards).
    UPDATE conversations c
       SET text_count = c.text_count + 1,
           last_message_id = CASE WHEN c.last_message_id IS NULL OR c.last_message_id < new_id
                                  THEN new_id ELSE c.last_message_id END,
           last_message_text = CASE WHEN c.last_message_id IS NULL OR c.last_message_id < new_id
                                    THEN p_text ELSE c.last_message_text END,
           last_message_image = CASE WHEN c.last_message_id IS NULL OR c.last_message_id < new_id
                                     THEN p_image_only ELSE c.last_message_image END,
           last_message_at = CASE WHEN c.last_message_id IS NULL OR c.last_message_id < new_id
                                  THEN p_created_at ELSE c.last_message_at END
     WHERE c.id = p_conversation_id
    RETURNING c.text_count, c.last_message_id = new_id INTO new_count, moved;

    -- The sender has read up to their message: when it is the newest, everything.
    UPDATE unreads r
       SET last_read_message_id = new_id, read_at = p_created_at,
           read_count = CASE WHEN moved THEN new_count ELSE r.read_count END
     WHERE r.conversation_id = p_conversation_id AND r.user_id = p_sender_id
       AND r.last_read_message_id < new_id;
    read_moved := FOUND;

    IF NOT moved THEN
        -- It landed behind pointers already past it (the sender's too): they have read one more.
        UPDATE unreads r
           SET read_count = new_count - (
               SELECT count(*) FROM messages m
                WHERE m.conversation_id = p_conversation_id AND m.kind = 'text'
                  AND m.id > r.last_read_message_id AND m.sender_id <> r.user_id)
         WHERE r.conversation_id = p_conversation_id AND r.last_read_message_id >= new_id;
    END IF;

    RETURN QUERY SELECT
        new_id, moved, read_moved, new_count,
        target.is_group, target.name, target.image_id, target.created_at,
        target.sender_name, target.sender_avatar,
        -- every member: [user id, hidden through, exact unread count, name, avatar]
        (SELECT coalesce(json_agg(json_build_array(
                    mb.user_id, mb.hidden_through, GREATEST(c.text_count - r.read_count, 0), u.name, u.avatar_id)),
                    '[]')
           FROM memberships mb
           JOIN unreads r ON r.conversation_id = mb.conversation_id AND r.user_id = mb.user_id
           JOIN conversations c ON c.id = mb.conversation_id
           JOIN users u ON u.id = mb.user_id
          WHERE mb.conversation_id = p_conversation_id);
END
$fn$
"""


def upgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute(SEND_FUNCTION)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS webchat_send(integer, integer, text, varchar, varchar, timestamptz, "
                   "varchar, boolean)")
