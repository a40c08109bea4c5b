"""Who is online: each web process keeps a Redis set of the users it holds sockets for.

A process's set expires unless its heartbeat renews it, so a crashed process's users go offline
within PRESENCE_TTL. The sets are listed in a sorted set by last beat, so readers skip dead ones.
"""
from __future__ import annotations

import os
import time
import uuid

import redis

PRESENCE_TTL = 60
PRESENCE_BEAT = 20
PROCESSES = "webchat:presence:procs"


def new_process_key() -> str:
    """Return the name of this process's presence set (host, pid and a random part)."""
    return f"webchat:presence:{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def mark(client: redis.Redis, process_key: str, user_id: int, online: bool, ttl: int = PRESENCE_TTL) -> None:
    """Add a user to this process's set (their first socket here) or take them out (their last)."""
    try:
        pipe = client.pipeline()
        (pipe.sadd if online else pipe.srem)(process_key, user_id)
        pipe.expire(process_key, ttl)
        pipe.zadd(PROCESSES, {process_key: time.time()})
        pipe.execute()
    except (redis.RedisError, OSError):
        pass  # the next heartbeat writes the whole set again


def beat(client: redis.Redis, process_key: str, user_ids, ttl: int = PRESENCE_TTL) -> None:
    """Rewrite this process's whole set and renew it (called every PRESENCE_BEAT seconds)."""
    pipe = client.pipeline()
    pipe.delete(process_key)
    if user_ids:
        pipe.sadd(process_key, *user_ids)
        pipe.expire(process_key, ttl)
    pipe.zadd(PROCESSES, {process_key: time.time()})
    pipe.execute()


def online_user_ids(client: redis.Redis, user_ids) -> set[int]:
    """Return which of these users have a socket open on any live process."""
    user_ids = [int(u) for u in user_ids]
    if not user_ids:
        return set()
    try:
        client.zremrangebyscore(PROCESSES, 0, time.time() - PRESENCE_TTL)
        keys = [k.decode() if isinstance(k, bytes) else k for k in client.zrange(PROCESSES, 0, -1)]
        if not keys:
            return set()
        pipe = client.pipeline()
        for key in keys:
            pipe.smismember(key, user_ids)
        online: set[int] = set()
        for flags in pipe.execute():
            online.update(uid for uid, flag in zip(user_ids, flags) if flag)
        return online
    except (redis.RedisError, OSError):
        return set()
