"""A prototype of a faster retention batch, measured before it was adopted (webchat.services.retention now runs
the same statement); kept so that the "prototype" runs on older snapshots (--app-dir) can be repeated.

The app's `purge_expired_messages` spends most of its time in Python building statements with
1,000-element IN lists (SQLAlchemy renders 1,000 bind parameters, psycopg splits the query text
again) and in three round trips a batch. This does the same work per batch in one statement:
pick the oldest expired ids, delete those messages and their images, and report which
conversations lost their last message; then reuses the app's own `refresh_last_message` and
commits. Same batches, same transaction boundaries, same result type. No lock and no
RetentionRun row: it is only run against the bench's scratch database.
"""
from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import text

BATCH_SQL = text("""
    WITH doomed AS (
        SELECT id FROM messages WHERE created_at < :cutoff ORDER BY id LIMIT :batch
    ), gone AS (
        DELETE FROM messages m USING doomed WHERE m.id = doomed.id
        RETURNING m.id, m.conversation_id, m.image_id
    ), images_gone AS (
        DELETE FROM images i USING gone WHERE i.id = gone.image_id RETURNING i.id
    )
    SELECT (SELECT count(*) FROM gone) AS messages,
           (SELECT count(*) FROM images_gone) AS images,
           (SELECT coalesce(array_agg(DISTINCT conversation_id), '{}') FROM gone) AS conversations,
           (SELECT coalesce(array_agg(c.id), '{}') FROM conversations c
             WHERE c.last_message_id IN (SELECT id FROM gone)) AS stale
""")


def purge_one_statement(days: int, batch_size: int):
    """Delete expired messages batch by batch, one statement a batch; return a PurgeResult."""
    from webchat.extensions import db
    from webchat.models import utcnow
    from webchat.services.conversations import refresh_last_message
    from webchat.services.retention import PurgeResult

    started = time.monotonic()
    result = PurgeResult()
    touched: set[int] = set()
    cutoff = utcnow() - timedelta(days=days)
    while True:
        row = db.session.execute(BATCH_SQL, {"cutoff": cutoff, "batch": batch_size}).one()
        if not row.messages:
            db.session.rollback()
            break
        refresh_last_message(row.stale)
        db.session.commit()
        result.messages += row.messages
        result.images += row.images
        result.batches += 1
        touched.update(row.conversations)
    result.conversations = len(touched)
    result.seconds = time.monotonic() - started
    return result
