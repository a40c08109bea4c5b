"""Retention: delete messages older than RETENTION_DAYS, in small transactions."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import redis
from flask import current_app
from sqlalchemy import delete, select, text

from ..extensions import db, redis_store
from ..models import Conversation, Image, Message, RetentionRun, utcnow
from . import sql_fast_paths
from .conversations import refresh_last_message
from .read_state import forget_texts

log = logging.getLogger(__name__)
LOCK_NAME = "webchat:retention:lock"


@dataclass
class PurgeResult:
    messages: int = 0
    images: int = 0
    conversations: int = 0
    batches: int = 0
    seconds: float = 0.0


def purge_expired_messages(days: int, batch_size: int | None = None, trigger: str = "cron") -> PurgeResult | None:
    """Delete messages older than `days` days with their images; None if another run holds the lock.

    Each batch is one transaction that deletes up to `batch_size` of the oldest expired messages
    and their images, takes them out of the unread counters, and repoints the last message of
    the conversations that lost theirs, so an interrupted run leaves nothing half-deleted and the
    next run simply carries on.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    batch_size = batch_size or current_app.config["RETENTION_BATCH"]
    lock = redis_store.client.lock(LOCK_NAME, timeout=600, blocking=False)
    try:
        locked = lock.acquire()
    except (redis.RedisError, OSError) as exc:
        # Without Redis there is no lock; the purge is idempotent, so run anyway rather than never.
        log.warning("retention lock unavailable (%s); purging without it", exc)
        lock, locked = None, True
    if not locked:
        return None
    started = time.monotonic()
    result = PurgeResult()
    touched: set[int] = set()
    cutoff = utcnow() - timedelta(days=days)
    try:
        while True:
            batch = _delete_batch(cutoff, batch_size)
            if batch is None:
                db.session.rollback()
                break
            deleted, images, conversation_ids, stale = batch
            refresh_last_message(stale)
            db.session.commit()
            result.messages += deleted
            result.images += images
            result.batches += 1
            touched.update(conversation_ids)
            if lock is not None:
                try:
                    lock.reacquire()
                except (redis.RedisError, OSError):
                    pass
        result.conversations = len(touched)
        result.seconds = time.monotonic() - started
        db.session.add(RetentionRun(days=days, messages_deleted=result.messages, images_deleted=result.images,
                                    conversations_touched=result.conversations, batches=result.batches,
                                    seconds=result.seconds, trigger=trigger))
        db.session.commit()
    except BaseException:  # a worker being killed too: never leave a half-done batch open
        db.session.rollback()
        raise
    finally:
        if lock is not None:
            try:
                lock.release()
            except Exception:  # expired or Redis gone: nothing to release
                pass
    return result


# PostgreSQL: one statement a batch. Passing 1,000 ids back and forth as bind parameters cost
# most of the purge's time (measured: 45-66 s for a million messages, 12.7 s like this).
_PG_BATCH = text("""
    WITH doomed AS (
        SELECT id FROM messages WHERE created_at < :cutoff ORDER BY id LIMIT :batch
    ), gone AS (
        DELETE FROM messages m USING doomed WHERE m.id = doomed.id
        RETURNING m.id, m.conversation_id, m.image_id, m.kind, m.sender_id
    ), images_gone AS (
        DELETE FROM images i USING gone WHERE i.id = gone.image_id RETURNING i.id
    ), texts_gone AS (  -- the unread counters, as read_state.forget_texts keeps them (tests/test_twins.py)
        UPDATE conversations c SET text_count = c.text_count - g.n
        FROM (SELECT conversation_id, count(*) AS n FROM gone WHERE kind = 'text' GROUP BY conversation_id) g
        WHERE c.id = g.conversation_id RETURNING c.id
    ), reads_gone AS (
        UPDATE unreads u SET read_count = u.read_count - g.n
        FROM (SELECT r.conversation_id, r.user_id, count(*) AS n
              FROM gone JOIN unreads r ON r.conversation_id = gone.conversation_id
                                      AND (gone.id <= r.last_read_message_id OR gone.sender_id = r.user_id)
              WHERE gone.kind = 'text' GROUP BY r.conversation_id, r.user_id) g
        WHERE u.conversation_id = g.conversation_id AND u.user_id = g.user_id RETURNING u.user_id
    )
    SELECT (SELECT count(*) FROM gone) AS messages,
           (SELECT count(*) FROM images_gone) AS images,
           (SELECT coalesce(array_agg(DISTINCT conversation_id), '{}') FROM gone) AS conversations,
           (SELECT coalesce(array_agg(c.id), '{}') FROM conversations c
             WHERE c.last_message_id IN (SELECT id FROM gone)) AS stale
""")


# The batch's conversations, locked (in id order) before the batch reads the unread counters it
# corrects: see conversations.lock_conversations.
_PG_LOCK = text("""
    SELECT c.id FROM conversations c
    WHERE c.id IN (SELECT conversation_id FROM (
        SELECT conversation_id FROM messages WHERE created_at < :cutoff ORDER BY id LIMIT :batch) AS doomed)
    ORDER BY c.id FOR NO KEY UPDATE
""")


def _delete_batch(cutoff, batch_size: int):
    """Delete the oldest expired messages (up to batch_size) and their images, uncommitted.

    Returns (messages, images, conversation ids, conversation ids whose last message went),
    or None when nothing is left to delete.
    """
    if sql_fast_paths():
        db.session.execute(_PG_LOCK, {"cutoff": cutoff, "batch": batch_size})
        row = db.session.execute(_PG_BATCH, {"cutoff": cutoff, "batch": batch_size}).one()
        if not row.messages:
            return None
        return row.messages, row.images, set(row.conversations), list(row.stale)
    rows = db.session.execute(
        select(Message.id, Message.conversation_id, Message.image_id)
        .where(Message.created_at < cutoff).order_by(Message.id).limit(batch_size)
    ).all()
    if not rows:
        return None
    ids = [r.id for r in rows]
    image_ids = [r.image_id for r in rows if r.image_id]
    conversation_ids = {r.conversation_id for r in rows}
    forget_texts(Message.id.in_(ids))
    db.session.execute(delete(Message).where(Message.id.in_(ids)))
    if image_ids:
        db.session.execute(delete(Image).where(Image.id.in_(image_ids)))
    stale = db.session.scalars(select(Conversation.id).where(
        Conversation.id.in_(conversation_ids), Conversation.last_message_id.in_(ids))).all()
    return len(ids), len(image_ids), conversation_ids, list(stale)


def last_run() -> RetentionRun | None:
    """Return the most recent purge run."""
    return db.session.scalar(select(RetentionRun).order_by(RetentionRun.id.desc()).limit(1))
