"""Publish domain events to every web process through Redis pub/sub (called after commit).

One channel for all events: each process's listener keeps what concerns its own sockets.
A message is published once per conversation (not once per recipient), so the send path does
constant work however large the group; the listener resolves membership for its local users.
Pub/sub is at-most-once: a lost event is recovered by replay from the database.
"""
from __future__ import annotations

import json
import logging
import time

import redis
from flask import current_app

from ..extensions import redis_store

CHANNEL = "webchat:events"
log = logging.getLogger(__name__)
_down_until = 0.0


def publish(event: dict) -> bool:
    """Publish an event; when Redis is down, log and carry on (the database stays the truth)."""
    global _down_until
    if time.monotonic() < _down_until:
        return False
    try:
        redis_store.client.publish(CHANNEL, json.dumps(event))
        return True
    except (redis.RedisError, OSError) as exc:
        # Do not make every send wait for a connect timeout while Redis is away.
        _down_until = time.monotonic() + current_app.config.get("PUBLISH_BACKOFF_SECONDS", 2)
        log.warning("publish failed, live push paused: %s", exc)
        return False


def message_created(cid: int, mid: int) -> None:
    publish({"type": "message", "cid": cid, "mid": mid})


def conversation_changed(cid: int, user_ids=None, removed_user_ids=None) -> None:
    publish({"type": "conversation", "cid": cid, "uids": user_ids, "removed": removed_user_ids or []})


def conversation_removed(cid: int, user_ids) -> None:
    publish({"type": "removed", "cid": cid, "uids": list(user_ids)})


def conversation_read(cid: int, uid: int) -> None:
    publish({"type": "read", "cid": cid, "uid": uid})


def typing(cid: int, uid: int, name: str) -> None:
    publish({"type": "typing", "cid": cid, "uid": uid, "name": name})


def close_user(uid: int, code: int = 1008) -> None:
    publish({"type": "close_user", "uid": uid, "code": code})


def close_session(sid: str) -> None:
    publish({"type": "close_session", "sid": sid})


def user_removed(uid: int, affected_user_ids) -> None:
    """Close a deleted or disabled user's sockets and refresh the lists of those who knew them."""
    close_user(uid)
    publish({"type": "refresh", "uids": list(affected_user_ids)})
