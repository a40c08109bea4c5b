"""The per-process hub: this process's sockets by user, and the Redis listener that feeds them."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from datetime import datetime
from functools import partial
from types import SimpleNamespace

import redis
from flask import Flask, current_app, render_template
from flask_babel import force_locale
from flask_babel import lazy_gettext as _l
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import joinedload
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import TextMessage

from ..extensions import db, redis_store
from ..models import Membership, Message

log = logging.getLogger(__name__)
PRESENCE_TTL = 60
PRESENCE_BEAT = 20
SENT_MEMORY = 5000


def _send_deadline(seconds: float):
    """A reusable timer that bounds a socket write under gevent, where a full TCP window would
    block forever; None without gevent's patched sockets (writes block the thread there)."""
    try:
        from gevent import Timeout
        from gevent.monkey import is_module_patched
    except ImportError:  # pragma: no cover - gevent is a dependency
        return None
    return Timeout(seconds) if is_module_patched("socket") else None


_ENCODER = WSConnection(ConnectionType.SERVER)


class Frame(str):
    """A text frame's HTML and, once asked for, its bytes on the wire.

    A server's frames are not masked, so the same bytes suit every socket: a message's frame for
    fifty members' sockets is encoded once, not fifty times. (Sockets never negotiate an
    extension: the handshake declines permessage-deflate.)
    """

    __slots__ = ("_wire",)

    @property
    def wire(self) -> bytes:
        try:
            return self._wire
        except AttributeError:
            # A final frame leaves the encoder's state as it was: one encoder serves every thread.
            self._wire = _ENCODER.send(TextMessage(data=str(self)))
            return self._wire


def _macros():
    """The fragment macros of chat/_macros.html, called directly for live frames.

    A frame is rendered for every new message on every process: calling the macros skips
    building a template context (and Flask's page context) for each one.
    """
    return current_app.jinja_env.get_template("chat/_macros.html").module


class WholeWrites:
    """A socket whose ``send`` writes all of its bytes, one caller at a time.

    simple-websocket 1.1.0 writes each frame with one ``socket.send`` and ignores a short write
    (simple-websocket issue #45): under gevent, when the peer's TCP window is nearly full, the
    rest of the frame is dropped and the next frame starts inside it, which corrupts the stream.
    Its reader thread also writes (pongs, the closing frame), so the writes share a lock.
    """

    def __init__(self, sock) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, data, flags: int = 0) -> int:
        view = memoryview(data)
        with self._lock:
            while view:
                view = view[self._sock.send(view, flags):]
        return len(data)

    sendall = send

    def __getattr__(self, name):
        return getattr(self._sock, name)


class Client:
    """One open socket: a send lock (flask-sock's send is not thread-safe) and what it has seen."""

    def __init__(self, ws, user_id: int, sid: str | None, locale: str, send_timeout: float = 5.0) -> None:
        self.ws = ws
        # A simple-websocket connection: its writes go whole through one lock, and encoded
        # frames go straight to the socket.
        self.wire: WholeWrites | None = None
        if hasattr(ws, "sock"):
            ws.sock = self.wire = WholeWrites(ws.sock)
        self._deadline = _send_deadline(send_timeout)
        self.user_id = user_id
        self.sid = sid
        self.locale = locale
        self.joined: int | None = None
        self.last_id = 0
        self.lock = threading.Lock()
        self._sent: OrderedDict[int, None] = OrderedDict()
        self._ready = False
        self._pending: list[tuple[int | None, str]] = []
        self._replayed: list[tuple[int | None, str]] = []

    def send(self, html: str, mid: int | None = None, replayed: bool = False) -> None:
        """Send a frame once; frames for a message already sent to this socket are dropped."""
        with self.lock:
            if mid is not None:
                if mid in self._sent:
                    return
                self._sent[mid] = None
                if len(self._sent) > SENT_MEMORY:
                    self._sent.popitem(last=False)
                self.last_id = max(self.last_id, mid)
            if not self._ready:
                # Live frames wait until replay has sent the older ones, to keep order.
                (self._replayed if replayed else self._pending).append((mid, html))
                return
            self._write(html)

    def _write(self, html: str) -> None:
        if self._deadline is not None:
            self._deadline.start()
        try:
            if isinstance(html, Frame) and self.wire is not None:
                if self.ws.connected:
                    self.wire.send(html.wire)
            else:
                self.ws.send(html)
        except BaseException as exc:  # gevent's Timeout is a BaseException
            if exc is not self._deadline:
                if isinstance(exc, Exception):
                    return  # a closing socket: its handler cleans up
                raise
            # A peer whose TCP window stays full would hold up every other delivery of this
            # process (the listener writes inline): cut it off; it reconnects and replays.
            log.warning("socket of user %s stopped reading: dropping it", self.user_id)
            self.abort()
        finally:
            if self._deadline is not None:
                self._deadline.cancel()

    def abort(self) -> None:
        """Drop the connection without a closing handshake (its send may be half-written)."""
        self.ws.connected = False
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def start_live(self) -> None:
        """Flush the frames that arrived during replay and send live from now on."""
        with self.lock:
            for _mid, html in self._replayed + self._pending:
                self._write(html)
            self._replayed.clear()
            self._pending.clear()
            self._ready = True

    def close(self, code: int, reason: str = "") -> None:
        with self.lock:
            try:
                self.ws.close(reason=code, message=reason)
            except Exception:
                pass


class Hub:
    def __init__(self) -> None:
        self.app: Flask | None = None
        self.clients: dict[int, set[Client]] = defaultdict(set)
        self.lock = threading.Lock()
        self.process_key = f"webchat:presence:{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._started = False
        self._stopping = False
        self._seq = 0
        self._next_seq = 0
        self._ready: dict[int, list[Callable[[], None]]] = {}
        self._emit_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(8)

    def init_app(self, app: Flask) -> None:
        self.app = app
        app.extensions["hub"] = self
        self._slots = threading.BoundedSemaphore(app.config.get("HUB_CONCURRENCY", 8))

    # -- sockets -----------------------------------------------------------------------------
    def add(self, client: Client) -> None:
        self._ensure_started()
        with self.lock:
            first = not self.clients[client.user_id]
            self.clients[client.user_id].add(client)
            # Under the lock: a heartbeat rewriting the set in between must not drop this user.
            if first:
                self._presence("sadd", client.user_id)

    def remove(self, client: Client) -> None:
        with self.lock:
            sockets = self.clients.get(client.user_id)
            if sockets is None:
                return
            sockets.discard(client)
            if not sockets:
                del self.clients[client.user_id]
                self._presence("srem", client.user_id)

    def clients_of(self, user_id: int) -> list[Client]:
        with self.lock:
            return list(self.clients.get(user_id, ()))

    def all_clients(self) -> list[Client]:
        with self.lock:
            return [c for group in self.clients.values() for c in group]

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
            try:
                pubsub = self._redis().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(redis_store.channel)
                if lost:
                    log.warning("pub/sub back: replaying to %d sockets", self.socket_count())
                    self._resync()
                    lost = False
                backoff = 0.5
                while not self._stopping:
                    item = pubsub.get_message(timeout=1.0)
                    if item and item.get("type") == "message":
                        self._submit(item["data"])
            except (redis.RedisError, OSError) as exc:
                lost = True
                log.warning("pub/sub lost (%s); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _heartbeat(self) -> None:
        """Keep this process's presence set alive; it expires if the process dies."""
        while not self._stopping:
            try:
                client = self._redis()
                # List and rewrite under the lock, so an add() in between is not wiped.
                with self.lock:
                    uids = list(self.clients)
                    pipe = client.pipeline()
                    pipe.delete(self.process_key)
                    if uids:
                        pipe.sadd(self.process_key, *uids)
                        pipe.expire(self.process_key, PRESENCE_TTL)
                    pipe.zadd("webchat:presence:procs", {self.process_key: time.time()})
                    pipe.execute()
            except (redis.RedisError, OSError) as exc:
                log.warning("presence heartbeat failed: %s", exc)
            time.sleep(PRESENCE_BEAT)

    def _presence(self, op: str, user_id: int) -> None:
        try:
            client = self.app.extensions["redis"]
            pipe = client.pipeline()
            getattr(pipe, op)(self.process_key, user_id)
            pipe.expire(self.process_key, PRESENCE_TTL)
            pipe.zadd("webchat:presence:procs", {self.process_key: time.time()})
            pipe.execute()
        except (redis.RedisError, OSError):
            pass

    # -- events ------------------------------------------------------------------------------
    # Events that need the database are planned concurrently (each plan waits on it), the
    # common rest (a message nobody here is viewing) right here in the listener; frames are
    # sent strictly in arrival order: each plan is filed under the event's sequence number and
    # whoever completes the next number sends everything ready.
    def _submit(self, raw) -> None:
        seq = self._seq
        self._seq += 1
        try:
            event = json.loads(raw)
        except ValueError:
            log.exception("unreadable event %r", raw)
            self._emit(seq, [])
            return
        if event.get("type") == "message" and "states" in event and not self._viewers(event):
            # No query to wait for: planned in the listener's own request context, no thread.
            self._emit(seq, self._plan_logged(event))
            return
        self._slots.acquire()  # back-pressure: at most HUB_CONCURRENCY events in flight
        threading.Thread(target=self._plan_and_emit, args=(seq, event), daemon=True).start()

    def _plan_and_emit(self, seq: int, event: dict) -> None:
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

    def _plan_safely(self, event: dict) -> list[Callable[[], None]]:
        """Plan an event in a request context of its own, and give its database session back."""
        if event.get("type") == "message" and "members" in event and not self._local_members(event):
            return []  # none of this process's users is in the conversation: nothing to do
        with self.app.test_request_context("/"):
            try:
                return self._plan_logged(event)
            finally:
                db.session.remove()

    def _plan_logged(self, event: dict) -> list[Callable[[], None]]:
        try:
            return self.plan(event)
        except Exception:
            log.exception("failed to plan event %r", event)
            return []

    def dispatch(self, event: dict) -> None:
        """Plan and deliver one event now (inside a request context)."""
        for action in self.plan(event):
            action()

    @staticmethod
    def _render(client: Client, template: str, **context) -> str:
        """Render a frame in the socket's own language."""
        with force_locale(client.locale):
            return render_template(template, **context)

    def plan(self, event: dict) -> list[Callable[[], None]]:
        """Return the sends and closes one event causes on this process's sockets, in order."""
        kind = event.get("type")
        out: list[Callable[[], None]] = []
        if kind == "message":
            # An event from an older version (without the members' states) is not pushed:
            # clients get it when they reconnect after the deploy, from replay.
            if "states" in event:
                self.plan_delivery(out, event)
        elif kind == "conversation":
            self.plan_rows(out, int(event["cid"]), event.get("uids"), event.get("removed") or [], event.get("mid"))
        elif kind == "removed":
            for uid in event.get("uids") or []:
                for client in self.clients_of(int(uid)):
                    out.append(partial(client.send, self._render(client, "realtime/_removed.html",
                                                                 cid=int(event["cid"]))))
        elif kind == "read":
            self.plan_rows(out, int(event["cid"]), [int(event["uid"])], [])
        elif kind == "typing":
            cid, uid = int(event["cid"]), int(event["uid"])
            viewers = [c for c in self.all_clients() if c.joined == cid and c.user_id != uid]
            if viewers:
                # Only current members: someone removed a moment ago may still have it open.
                members = set(db.session.scalars(select(Membership.user_id).where(
                    Membership.conversation_id == cid,
                    Membership.user_id.in_({c.user_id for c in viewers}))).all())
                for client in viewers:
                    if client.user_id in members:
                        out.append(partial(client.send, self._render(client, "realtime/_typing.html", cid=cid,
                                                                     name=event.get("name", ""), uid=event.get("uid"))))
        elif kind == "close_user":
            for client in self.clients_of(int(event["uid"])):
                out.append(partial(client.close, int(event.get("code", 1008)), "signed out"))
        elif kind == "close_session":
            for client in self.all_clients():
                if client.sid and client.sid == event.get("sid"):
                    out.append(partial(client.close, 1008, "signed out"))
        elif kind == "refresh":
            for uid in event.get("uids") or []:
                for client in self.clients_of(int(uid)):
                    out.append(partial(client.send, self._render(client, "realtime/_refresh.html")))
        return out

    def _local_members(self, event: dict) -> list[int]:
        with self.lock:
            return [int(uid) for uid in event["members"] if int(uid) in self.clients]

    def _viewers(self, event: dict) -> list[int]:
        """Local members (not the sender) with a socket viewing the message's conversation."""
        cid, sender_id = int(event["cid"]), event["m"]["sender_id"]
        return [uid for uid in self._local_members(event)
                if uid != sender_id and any(client.joined == cid for client in self.clients_of(uid))]

    def plan_delivery(self, out: list, event: dict) -> None:
        """Push a new message from what its event carries; no query unless someone is viewing it."""
        from ..services.conversations import mark_read_for

        local = set(self._local_members(event))
        if not local:
            return
        cid, mid, m, c = int(event["cid"]), int(event["mid"]), event["m"], event["c"]
        created_at = datetime.fromisoformat(m["created_at"])
        sender = SimpleNamespace(id=m["sender_id"], name=m["sender_name"], avatar_id=m["sender_avatar"])
        message = SimpleNamespace(id=mid, conversation_id=cid, kind="text", sender_id=m["sender_id"], sender=sender,
                                  body=m["body"], image_id=m["image_id"], created_at=created_at)
        conversation = SimpleNamespace(
            id=cid, is_group=c["is_group"], name=c["name"], image_id=c["image_id"],
            created_at=datetime.fromisoformat(c["created_at"]), last_message_id=mid, last_message_at=created_at,
            last_message_text=c["text"], last_message_image=c["image"])
        hidden = {uid: hidden_through for uid, hidden_through, _count in event["states"] if uid in local}
        unread = {uid: count for uid, _hidden, count in event["states"] if uid in local}
        # A 1:1's row shows the other person, whose name and avatar the event carries.
        people = {uid: SimpleNamespace(id=uid, name=name, avatar_id=avatar) for uid, name, avatar in event["people"]}
        # A socket viewing this conversation reads arriving messages at once (one UPDATE for all).
        viewing = self._viewers(event)
        if viewing:
            for uid in mark_read_for(cid, viewing, mid):
                unread[uid] = 0
        # A frame is the message and, unless hidden, the member's list row with their own badge.
        # The message is rendered once per language, the row up to the badge once per language (a
        # 1:1's once per side), the row's closing tags once, each badge once per count: a group's
        # row is not rendered again for every member. Macros, not pages: no page context is built.
        # Only the message and the row have words to translate, so the language is switched once
        # per language. Each frame is those rendered pieces joined around the member's badge (in a
        # group nearly every member has their own count: one macro call per count).
        targets: list[tuple[Client, tuple, int]] = []
        keys: dict[str, dict[tuple, object]] = {}  # locale -> row key -> the row's peer
        for uid, count in unread.items():
            visible = hidden[uid] is None or hidden[uid] < mid
            peer = None if conversation.is_group else next((p for pid, p in people.items() if pid != uid), None)
            for client in self.clients_of(uid):
                key = (visible, peer.id if peer else None, client.locale)
                keys.setdefault(client.locale, {})[key] = peer
                targets.append((client, key, count))
        macros = _macros()
        heads: dict[tuple, Markup] = {}
        for locale, peers in keys.items():
            with force_locale(locale):
                item = macros.message_oob(message)
                for key, peer in peers.items():
                    # The row's start holds no count (the badge does): one start serves every count.
                    row = macros.row_oob_start(self._delivery_row(conversation, peer, 0)) if key[0] else None
                    heads[key] = macros.frame_head(item, row)
        close = macros.row_oob_end()
        frames: dict[tuple, str] = {}
        for client, key, count in targets:
            frame = frames.get((key, count))
            if frame is None:
                visible = key[0]
                frame = frames[key, count] = Frame(heads[key] + macros.badge(cid, count) + close if visible
                                                   else heads[key])
            out.append(partial(client.send, frame, mid=mid))

    @staticmethod
    def _delivery_row(conversation, peer, unread: int):
        from ..services.conversations import ConversationRow

        if conversation.is_group:
            return ConversationRow(conversation, conversation.name or "", conversation.image_id, None, unread)
        title = peer.name if peer else str(_l("Deleted user"))
        return ConversationRow(conversation, title, peer.avatar_id if peer else None, peer, unread)

    def plan_rows(self, out: list, cid: int, uids, removed_uids, line_id=None) -> None:
        """Fresh list rows of one conversation for local members (or for the given users).

        When the change added a system line (created, added, removed, left, renamed), each member
        gets it with their row, as a new message: an open conversation shows it at once.
        """
        from ..services.conversations import rows_for_members

        with self.lock:
            local = set(self.clients)
        removed = {int(u) for u in removed_uids}
        for uid in removed & local:
            for client in self.clients_of(uid):
                out.append(partial(client.send, self._render(client, "realtime/_removed.html", cid=cid)))
        wanted = (local if uids is None else {int(u) for u in uids} & local) - removed
        if not wanted:
            return
        rows = rows_for_members(cid, wanted)
        line = None
        if line_id is not None and rows:
            line = db.session.scalar(select(Message).options(joinedload(Message.sender)).where(
                Message.id == int(line_id), Message.conversation_id == cid))
        for uid in wanted:
            if uid not in rows and uids is None:
                continue  # not a member: nothing to show or take away
            row = rows.get(uid)
            is_member = uid in rows  # with no row: hidden, so it leaves the list but stays open
            for client in self.clients_of(uid):
                if row is None:  # hidden, or no longer a member
                    out.append(partial(client.send, self._render(client, "realtime/_removed.html", cid=cid,
                                                                 hidden=is_member)))
                elif line is not None:
                    out.append(partial(client.send, self._render(client, "realtime/_message_frame.html", message=line,
                                                                 row=row, me_id=uid), mid=line.id))
                else:
                    out.append(partial(client.send, self._render(client, "realtime/_row_frame.html", row=row)))

    def replay(self, client: Client, after: int, page: int = 500, max_pages: int = 10) -> int:
        """Send, in order, the messages newer than `after` in the client's conversations.

        A gap larger than `page * max_pages` messages is not streamed: the page is told to reload.
        """
        from ..services.conversations import rows_for_user
        from ..services.messages import messages_for_replay

        messages: list[Message] = []
        cursor, lookback = after, True
        for _ in range(max_pages):
            batch = messages_for_replay(client.user_id, cursor, limit=page, lookback=lookback)
            messages.extend(batch)
            if len(batch) < page:
                break
            cursor, lookback = batch[-1].id, False
        else:
            client.send(self._render(client, "realtime/_reload.html"), replayed=True)
            return 0
        last_by_conv: dict[int, int] = {}
        for m in messages:
            last_by_conv[m.conversation_id] = m.id
        rows = rows_for_user(client.user_id, last_by_conv)
        with force_locale(client.locale):
            for m in messages:
                row = rows.get(m.conversation_id) if last_by_conv[m.conversation_id] == m.id else None
                html = render_template("realtime/_message_frame.html", message=m, row=row, me_id=client.user_id)
                client.send(html, mid=m.id, replayed=True)
        return len(messages)

    def _resync(self) -> None:
        for client in self.all_clients():
            try:
                with self.app.test_request_context("/"):
                    try:
                        self.replay(client, client.last_id)
                    finally:
                        db.session.remove()
            except Exception:
                log.exception("resync failed")


hub = Hub()


def online_user_ids(client: redis.Redis, user_ids) -> set[int]:
    """Return which of these users have a socket open on any live process."""
    user_ids = [int(u) for u in user_ids]
    if not user_ids:
        return set()
    try:
        cutoff = time.time() - PRESENCE_TTL
        client.zremrangebyscore("webchat:presence:procs", 0, cutoff)
        keys = [k.decode() if isinstance(k, bytes) else k for k in client.zrange("webchat:presence:procs", 0, -1)]
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
