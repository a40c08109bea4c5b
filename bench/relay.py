"""The reference relay: the smallest flask-sock app that pushes a posted text to sockets.

No database, no auth, no templates: it is the ceiling of the stack (Flask + flask-sock +
gunicorn's gevent worker with webchat's own gunicorn config). Run it like the app:

    gunicorn -c webchat/gunicorn_conf.py bench.relay:app

- `GET /ws?key=K` registers a socket under key K (a stand-in for a user id).
- `POST /send` with form fields `text` and `to` (comma-separated keys; empty: every socket)
  pushes `text` to those keys' sockets. A JSON frame `{"to": "a,b", "text": "..."}` sent on a
  socket does the same, so HTTP and WebSocket sends can be compared with webchat's.
- With RELAY_REDIS_URL set, a send is published on Redis and every process's listener delivers
  to its own sockets (as webchat's hub does); without it, delivery stays in this process.
- With RELAY_DATABASE_URL set (the `relay-db` target), every send is first written to
  PostgreSQL: one INSERT and COMMIT through SQLAlchemy Core and psycopg, with webchat's pool
  settings. Still no auth, no membership check, no unread counts, no templates: it is the
  ceiling of a chat that keeps its messages, on this stack.
- With RELAY_SQL=webchat as well (the `relay-sql` target), the database is a migrated webchat
  database with the bench's users and conversations, and every send runs webchat's own send
  instead of the INSERT: one call of `webchat_send()` (migration 0003: it checks membership,
  inserts the message, counts it, moves the last message and the sender's pointer and returns
  every member's exact unread count) outside a transaction, as webchat's send route makes it
  (`messages.SEND_CALL`), with the conversation id, sender id and client id the load generator
  posts as `cid`, `uid` and `client_id`. Still no auth, no CSRF, no session, no templates: only
  the database work of one webchat message, so its rate is the ceiling for webchat's data model
  on this stack.
"""
from __future__ import annotations

import json
import os
import threading
from collections import defaultdict

from flask import Flask, request
from flask_sock import Sock

app = Flask(__name__)
app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": 25}
sock = Sock(app)

CHANNEL = "relay:events"
REDIS_URL = os.environ.get("RELAY_REDIS_URL")
_sockets: dict[str, set] = defaultdict(set)
_locks: dict[int, threading.Lock] = {}
_registry_lock = threading.Lock()
_listener_started = False
_redis = None
DATABASE_URL = os.environ.get("RELAY_DATABASE_URL")
WEBCHAT_SQL = os.environ.get("RELAY_SQL") == "webchat"
_engine = None
_insert = None


def _persist(sender: str, to: str, text: str, send: dict) -> None:
    """Keep the message (relay-db, relay-sql): the durable write any chat needs per message."""
    global _engine, _insert
    if not DATABASE_URL:
        return
    with _registry_lock:  # one engine (one pool) per process, however many sends arrive first
        if _engine is None:
            _engine, _insert = _make_engine()
    if WEBCHAT_SQL:
        _webchat_send(int(send["cid"]), int(send["uid"]), text, send.get("client_id") or None)
        return
    with _engine.begin() as conn:
        conn.execute(_insert, {"sender": sender, "recipients": to, "body": text})


def _webchat_send(cid: int, uid: int, text: str, client_id: str | None) -> None:
    """Run webchat's send (relay-sql): its statement, the values its send route passes."""
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from webchat.services.messages import SEND_CALL

    try:
        from webchat.services.message_text import preview_of  # since issue 17
    except ImportError:
        from webchat.services.messages import preview_of

    # In autocommit, as webchat's send: the function is its own transaction (one round trip).
    with _engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        row = conn.execute(SEND_CALL, {
            "p_conversation_id": cid, "p_sender_id": uid, "p_body": text, "p_image_id": None,
            "p_client_id": client_id, "p_created_at": datetime.now(timezone.utc),
            "p_text": preview_of(SimpleNamespace(kind="text", body=text)), "p_image_only": False}).one_or_none()
        if row is None:
            raise LookupError("not an active member")


def _make_engine():
    """Return an engine with webchat's pool settings and the insert statement (creating the table)."""
    from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table, Text, create_engine, func, inspect

    url = DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, pool_size=20, max_overflow=10)
    if WEBCHAT_SQL:
        return engine, None  # webchat's own tables, migrated by the bench
    table = Table("relay_messages", MetaData(),
                  Column("id", BigInteger, primary_key=True, autoincrement=True),
                  Column("sender", Text), Column("recipients", Text), Column("body", Text, nullable=False),
                  Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False))
    try:
        table.create(engine, checkfirst=True)
    except Exception:  # the other worker created it at the same moment
        engine.dispose()
        if not inspect(engine).has_table("relay_messages"):
            raise
    return engine, table.insert()


def _deliver(to: str, text: str) -> None:
    """Send text to the local sockets of the given keys (or to all)."""
    with _registry_lock:
        if to:
            targets = [ws for key in to.split(",") for ws in _sockets.get(key, ())]
        else:
            targets = [ws for group in _sockets.values() for ws in group]
    for ws in targets:
        lock = _locks.get(id(ws))
        if lock is None:
            continue
        with lock:  # simple-websocket's send is not safe from two greenlets at once
            try:
                ws.send(text)
            except Exception:
                pass


def _listen() -> None:
    import redis

    pubsub = redis.Redis.from_url(REDIS_URL).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    for item in pubsub.listen():
        if item.get("type") == "message":
            event = json.loads(item["data"])
            _deliver(event["to"], event["text"])


def _ensure_listener() -> None:
    global _listener_started, _redis
    if not REDIS_URL or _listener_started:
        return
    with _registry_lock:
        if _listener_started:
            return
        import redis

        _redis = redis.Redis.from_url(REDIS_URL)
        _listener_started = True
    threading.Thread(target=_listen, daemon=True).start()


def relay(to: str, text: str, sender: str = "", send: dict | None = None) -> None:
    """Publish to every process when there are several, else deliver here."""
    _ensure_listener()
    _persist(sender, to, text, send or {})
    if _redis is not None:
        _redis.publish(CHANNEL, json.dumps({"to": to, "text": text}))
    else:
        _deliver(to, text)


@app.get("/healthz")
def healthz():
    """Answer that the relay is up."""
    _ensure_listener()
    return {"status": "ok"}


@app.post("/send")
def send():
    """Relay a posted text to the sockets of the `to` keys."""
    relay(request.form.get("to", ""), request.form["text"], request.form.get("from", ""), request.form)
    return "", 204


@sock.route("/ws")
def ws(socket):
    """Hold a socket under its key; relay the JSON frames it sends."""
    _ensure_listener()
    key = request.args.get("key", "")
    with _registry_lock:
        _sockets[key].add(socket)
        _locks[id(socket)] = threading.Lock()
    try:
        while True:
            raw = socket.receive()
            if raw is None:
                continue
            frame = json.loads(raw)
            relay(frame.get("to", ""), frame["text"], key, frame)
    finally:
        with _registry_lock:
            _sockets[key].discard(socket)
            if not _sockets[key]:
                del _sockets[key]
            _locks.pop(id(socket), None)
