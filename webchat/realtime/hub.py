"""The per-process hub: this process's sockets by user, and the Redis listener that feeds them.

The listener decodes each published event (webchat.events), asks the renderer for its type what
frames it causes here (realtime.renderers), and sends them in the order the events arrived.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import suppress

import redis
from flask import Flask

from .. import presence
from ..events import Event, MessageSent, decode
from ..extensions import db, redis_store
from .limits import PerUser, Settings
from .renderers import plan
from .replay import replay
from .transport import Client

log = logging.getLogger(__name__)
SUBSCRIBE_TIMEOUT = 5.0  # seconds Redis may take to confirm the listener's subscription


class Hub:
    """This process's sockets, and the thread that delivers published events to them."""

    def __init__(self) -> None:
        self.app: Flask | None = None
        self.clients: dict[int, set[Client]] = defaultdict(set)
        self.lock = threading.Lock()
        self.process_key = presence.new_process_key()
        self._started = False
        self._stopping = False
        self._seq = 0
        self._next_seq = 0
        self._ready: dict[int, list[Callable[[], None]]] = {}
        self._emit_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(8)
        # `subscribed`: Redis has confirmed the listener's subscription, so events published from
        # now on reach this process. `settled`: that, or a failed attempt owes every socket a
        # replay when the subscription is back: either way a socket's catch-up misses nothing.
        self.subscribed = threading.Event()
        self.settled = threading.Event()
        self.limits = PerUser(Settings())
        self._presence_ttl, self._presence_beat = presence.PRESENCE_TTL, presence.PRESENCE_BEAT

    def init_app(self, app: Flask) -> None:
        self.app = app
        app.extensions["hub"] = self
        self._slots = threading.BoundedSemaphore(app.config.get("HUB_CONCURRENCY", 8))
        self.limits = PerUser(Settings.from_config(app.config))
        self._presence_ttl = int(app.config.get("PRESENCE_TTL", presence.PRESENCE_TTL))
        self._presence_beat = float(app.config.get("PRESENCE_BEAT", presence.PRESENCE_BEAT))

    # -- sockets -----------------------------------------------------------------------------
    def add(self, client: Client) -> None:
        """Register an open socket (its user goes online with their first one here)."""
        self._ensure_started()
        with self.lock:
            first = not self.clients[client.user_id]
            self.clients[client.user_id].add(client)
            # Under the lock: a heartbeat rewriting the set in between must not drop this user.
            if first:
                self._mark_presence(client.user_id, True)

    def wait_until_live(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until events published from now on reach this process's sockets.

        The listener starts with the process's first socket: replaying before its subscription is
        confirmed would lose a message committed after the replay's query and published before
        the subscription, which reaches neither.
        """
        self._ensure_started()
        return self.settled.wait(timeout)

    def remove(self, client: Client) -> None:
        """Forget a closed socket (its user goes offline here with their last one)."""
        with self.lock:
            sockets = self.clients.get(client.user_id)
            if sockets is None:
                return
            sockets.discard(client)
            if not sockets:
                del self.clients[client.user_id]
                self._mark_presence(client.user_id, False)

    def clients_of(self, user_id: int) -> list[Client]:
        with self.lock:
            return list(self.clients.get(user_id, ()))

    def all_clients(self) -> list[Client]:
        with self.lock:
            return [c for group in self.clients.values() for c in group]

    def local_user_ids(self) -> set[int]:
        with self.lock:
            return set(self.clients)

    def socket_count(self) -> int:
        return len(self.all_clients())

    def close_all(self, code: int = 1012, reason: str = "server restart") -> None:
        """Close every local socket, by default with 1012 so browsers reconnect elsewhere."""
        self._stopping = True
        for client in self.all_clients():
            client.close(code, reason)

    def watch_worker(self, worker) -> None:
        """Close every socket with 1012 as soon as a gunicorn worker starts shutting down."""

        def watch() -> None:
            while worker.alive:
                time.sleep(0.2)
            log.info("worker stopping: closing %d sockets with 1012", self.socket_count())
            self.close_all(1012, "server restart")

        threading.Thread(target=watch, name="webchat-shutdown", daemon=True).start()

    def replay(self, client: Client, after: int) -> int:
        """Send a (re)connecting socket the messages newer than `after` (see realtime.replay)."""
        return replay(client, after)

    # -- background work ---------------------------------------------------------------------
    def _ensure_started(self) -> None:
        with self.lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._listen, name="webchat-listener", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="webchat-presence", daemon=True).start()

    def _redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.app.config["REDIS_URL"], socket_connect_timeout=2,
                                    socket_timeout=10, health_check_interval=15)

    def _listen(self) -> None:
        """Deliver published events to local sockets; after a Redis outage, resubscribe and replay."""
        # Events planned in this thread render in this one request context (url_for needs one).
        with self.app.test_request_context("/"):
            self._listen_loop()

    def _listen_loop(self) -> None:
        backoff = 0.5
        lost = False
        while not self._stopping:
            pubsub = self._redis().pubsub()
            try:
                self._subscribe(pubsub)
                if lost:
                    # Only now: a replay before the confirmation could miss what is published meanwhile.
                    log.warning("pub/sub back: replaying to %d sockets", self.socket_count())
                    self._resync()
                    lost = False
                backoff = 0.5
                while not self._stopping:
                    item = pubsub.get_message(timeout=1.0)
                    if item and item.get("type") == "message":
                        self._submit(item["data"])
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                lost = True
                self.settled.set()  # sockets that register meanwhile are replayed to when it is back
                log.warning("pub/sub lost (%s); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with suppress(redis.RedisError, OSError):
                    pubsub.close()

    def _subscribe(self, pubsub) -> None:
        """Subscribe to the events channel and return once Redis has confirmed it."""
        pubsub.subscribe(redis_store.channel)
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
        while (item := pubsub.get_message(timeout=1.0)) is None or item.get("type") != "subscribe":
            if time.monotonic() > deadline:
                raise redis.TimeoutError("the subscription was not confirmed")
        self.subscribed.set()
        self.settled.set()

    def _heartbeat(self) -> None:
        """Keep this process's presence set alive (it expires if the process dies); forget idle limits."""
        client = self._redis()
        while not self._stopping:
            try:
                # Listed and written under the lock, so an add() in between is not wiped.
                with self.lock:
                    presence.beat(client, self.process_key, list(self.clients), self._presence_ttl)
            except (redis.RedisError, OSError) as exc:
                log.warning("presence heartbeat failed: %s", exc)
            self.limits.forget_idle(keep=self.local_user_ids())
            time.sleep(self._presence_beat)

    def _mark_presence(self, user_id: int, online: bool) -> None:
        client = self.app.extensions["redis"]
        presence.mark(client, self.process_key, user_id, online, self._presence_ttl)

    def _resync(self) -> None:
        for client in self.all_clients():
            try:
                with self.app.test_request_context("/"):
                    try:
                        replay(client, client.last_id)
                    finally:
                        db.session.remove()
            except Exception:
                log.exception("resync failed")

    # -- events ------------------------------------------------------------------------------
    # Events that need the database are planned concurrently (each plan waits on it), the
    # common rest (a message nobody here is viewing) right here in the listener; frames are
    # sent strictly in arrival order: each plan is filed under the event's sequence number and
    # whoever completes the next number sends everything ready.
    def _submit(self, raw) -> None:
        seq = self._seq
        self._seq += 1
        try:
            event = decode(raw)
        except (ValueError, TypeError, KeyError):
            log.exception("unreadable event %r", raw)
            self._emit(seq, [])
            return
        if isinstance(event, MessageSent) and not self.viewers(event):
            # No query to wait for: planned in the listener's own request context, no thread.
            self._emit(seq, self._plan_logged(event))
            return
        self._slots.acquire()  # back-pressure: at most HUB_CONCURRENCY events in flight
        threading.Thread(target=self._plan_and_emit, args=(seq, event), daemon=True).start()

    def _plan_and_emit(self, seq: int, event: Event) -> None:
        actions: list[Callable[[], None]] = []
        try:
            actions = self._plan_safely(event)
        finally:
            self._slots.release()
            self._emit(seq, actions)

    def _emit(self, seq: int, actions: list[Callable[[], None]]) -> None:
        with self._emit_lock:
            self._ready[seq] = actions
            while self._next_seq in self._ready:
                for action in self._ready.pop(self._next_seq):
                    try:
                        action()
                    except Exception:
                        log.exception("frame delivery failed")
                self._next_seq += 1

    def _plan_safely(self, event: Event) -> list[Callable[[], None]]:
        """Plan an event in a request context of its own, and give its database session back."""
        if isinstance(event, MessageSent) and not self.local_members(event):
            return []  # none of this process's users is in the conversation: nothing to do
        with self.app.test_request_context("/"):
            try:
                return self._plan_logged(event)
            finally:
                db.session.remove()

    def _plan_logged(self, event: Event) -> list[Callable[[], None]]:
        try:
            return plan(self, event)
        except Exception:
            log.exception("failed to plan event %r", event)
            return []

    def dispatch(self, event: Event) -> None:
        """Plan and deliver one event now (inside a request context)."""
        for action in plan(self, event):
            action()

    def local_members(self, event: MessageSent) -> list[int]:
        """The message's members who have a socket on this process."""
        with self.lock:
            return [uid for uid in event.member_ids if uid in self.clients]

    def viewers(self, event: MessageSent) -> list[int]:
        """Local members (not the sender) with a socket viewing the message's conversation."""
        cid, sender_id = event.message.conversation_id, event.message.sender_id
        return [uid for uid in self.local_members(event)
                if uid != sender_id and any(client.joined == cid for client in self.clients_of(uid))]


hub = Hub()
