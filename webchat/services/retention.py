"""Retention: delete messages older than RETENTION_DAYS, in small transactions."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import redis
from flask import current_app
from sqlalchemy import delete, select

from ..extensions import db, redis_store
from ..models import Conversation, Image, Message, RetentionRun, utcnow

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

    Each batch is one transaction that deletes up to `batch_size` of the oldest expired messages,
    their images, and repoints the last message of the conversations that lost theirs, so an
    interrupted run leaves nothing half-deleted and the next run simply carries on.
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
            rows = db.session.execute(
                select(Message.id, Message.conversation_id, Message.image_id)
                .where(Message.created_at < cutoff).order_by(Message.id).limit(batch_size)
            ).all()
            if not rows:
                break
            ids = [r.id for r in rows]
            image_ids = [r.image_id for r in rows if r.image_id]
            conversation_ids = {r.conversation_id for r in rows}
            db.session.execute(delete(Message).where(Message.id.in_(ids)))
            if image_ids:
                db.session.execute(delete(Image).where(Image.id.in_(image_ids)))
            stale = db.session.scalars(select(Conversation.id).where(
                Conversation.id.in_(conversation_ids), Conversation.last_message_id.in_(ids))).all()
            from .conversations import refresh_last_message

            refresh_last_message(stale)
            db.session.commit()
            result.messages += len(ids)
            result.images += len(image_ids)
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


def last_run() -> RetentionRun | None:
    """Return the most recent purge run."""
    return db.session.scalar(select(RetentionRun).order_by(RetentionRun.id.desc()).limit(1))
