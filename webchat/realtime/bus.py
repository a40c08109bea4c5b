"""Publish domain events to every web process through Redis pub/sub (called after commit).

One channel for all events (`redis_store.channel`, named after the Redis database): each
process's listener keeps what concerns its own sockets.
A message is published once (not once per recipient), with its fields and member ids, by
services.messages.send_message; each listener pushes it to its own members' sockets.
Pub/sub is at-most-once: a lost event is recovered by replay from the database.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import deque

import redis

from ..extensions import redis_store

log = logging.getLogger(__name__)
# Events that could not be published while Redis was away; sent first by the next publish.
_unsent: deque[str] = deque(maxlen=1000)
_unsent_lock = threading.Lock()


def publish(event: dict) -> bool:
    """Publish an event; when Redis is down, keep it for later and carry on (the database stays the truth)."""
    payload = json.dumps(event)
    client = redis_store.client
    with _unsent_lock:
        try:
            while _unsent:
                client.publish(redis_store.channel, _unsent[0])
                _unsent.popleft()
            client.publish(redis_store.channel, payload)
            return True
        except (redis.RedisError, OSError) as exc:
            _unsent.append(payload)
            log.warning("publish failed (%s); %d events wait for Redis", exc, len(_unsent))
            return False


def conversation_changed(cid: int, user_ids=None, removed_user_ids=None, line: int | None = None) -> None:
    """Refresh the conversation's list rows; `line` is the system line the change added (pushed with them)."""
    publish({"type": "conversation", "cid": cid, "uids": user_ids, "removed": removed_user_ids or [], "mid": line})


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
