"""Domain events: one small type per kind, emitted by services and published after commit.

A service calls ``emit(event)`` where it changes something others must see. The event waits on
the SQLAlchemy session and goes to Redis pub/sub only once the transaction commits (a rollback
drops it); outside a transaction it goes at once. Every web process's listener
(realtime.hub) decodes it back into the same type and renders it (realtime.renderers).
Pub/sub is at-most-once: the database stays the truth, and replay fills gaps.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import deque
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import ClassVar

import redis
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from .extensions import db, redis_store

log = logging.getLogger(__name__)


# -- what a live frame renders from: the same attribute names as the models ------------------

@dataclass(slots=True)
class Person:
    """A user as a message or a 1:1 list row shows them."""

    id: int
    name: str
    avatar_id: str | None


@dataclass(slots=True)
class MessageView:
    """A new text message, with the attributes chat/_macros.html reads from models.Message."""

    id: int
    conversation_id: int
    sender_id: int | None
    sender: Person | None
    body: str
    image_id: str | None
    created_at: datetime
    kind: str = "text"


@dataclass(slots=True)
class ConversationView:
    """A conversation as its list row shows it right after a message (models.Conversation's names)."""

    id: int
    is_group: bool
    name: str | None
    image_id: str | None
    created_at: datetime
    last_message_id: int
    last_message_at: datetime
    last_message_text: str
    last_message_image: bool


@dataclass(slots=True)
class RecipientState:
    """A member's list state as of a send: hidden position and exact unread count."""

    user_id: int
    hidden_through: int | None
    unread: int


# -- the events ----------------------------------------------------------------------------

class Event:
    """Base of every event type; `kind` names it on the wire."""

    kind: ClassVar[str] = ""


@dataclass(slots=True)
class MessageSent(Event):
    """A new message, carrying all its listeners need: they render and push without a query."""

    kind: ClassVar[str] = "message"
    message: MessageView
    conversation: ConversationView
    members: list[RecipientState]
    people: list[Person] = field(default_factory=list)  # a 1:1's two members (each row shows the other)

    @property
    def member_ids(self) -> list[int]:
        return [m.user_id for m in self.members]


@dataclass(slots=True)
class ConversationChanged(Event):
    """List rows to refresh (everyone's, or `user_ids`'); `line_id` is the system line it added."""

    kind: ClassVar[str] = "conversation"
    conversation_id: int
    user_ids: list[int] | None = None
    removed_user_ids: list[int] = field(default_factory=list)
    line_id: int | None = None


@dataclass(slots=True)
class ConversationRemoved(Event):
    """A conversation deleted (disbanded, or by an admin): its members' rows and pages let it go."""

    kind: ClassVar[str] = "removed"
    conversation_id: int
    user_ids: list[int]


@dataclass(slots=True)
class ConversationRead(Event):
    """A member's read pointer moved: their other tabs clear the badge."""

    kind: ClassVar[str] = "read"
    conversation_id: int
    user_id: int


@dataclass(slots=True)
class Typing(Event):
    """A member is typing (nothing stored)."""

    kind: ClassVar[str] = "typing"
    conversation_id: int
    user_id: int
    name: str


@dataclass(slots=True)
class UserClosed(Event):
    """Close every socket of a user (disabled, deleted)."""

    kind: ClassVar[str] = "close_user"
    user_id: int
    code: int = 1008


@dataclass(slots=True)
class SessionClosed(Event):
    """Close every socket of one signed-out browser session."""

    kind: ClassVar[str] = "close_session"
    session_id: str


@dataclass(slots=True)
class ListsStale(Event):
    """These users' lists changed in ways rows cannot say (a contact deleted): reload them."""

    kind: ClassVar[str] = "refresh"
    user_ids: list[int]


EVENT_TYPES: dict[str, type[Event]] = {cls.kind: cls for cls in (
    MessageSent, ConversationChanged, ConversationRemoved, ConversationRead, Typing, UserClosed, SessionClosed,
    ListsStale)}


# -- the wire: JSON with the fields' own names ------------------------------------------------

def _plain(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def encode(event: Event) -> str:
    """Return the event as the JSON text published on the channel."""
    body = _encode_message(event) if isinstance(event, MessageSent) else _plain(event)
    return json.dumps({"type": event.kind, **body})


def decode(raw: str | bytes) -> Event:
    """Return the event a published JSON text describes; ValueError if it describes none."""
    data = json.loads(raw)
    cls = EVENT_TYPES.get(data.pop("type", None) if isinstance(data, dict) else None)
    if cls is None:
        raise ValueError(f"not an event: {raw[:80]!r}")
    if cls is MessageSent:
        return _decode_message(data)
    return cls(**data)


# A message event is published for every message and decoded by every web process: its encoding
# is written out rather than introspected (a quarter of the cost), and its members and people
# travel as rows in their types' field order (a group has up to 201), read back into those types.
def _encode_message(event: MessageSent) -> dict:
    m, c, sender = event.message, event.conversation, event.message.sender
    return {
        "message": {"id": m.id, "conversation_id": m.conversation_id, "sender_id": m.sender_id,
                    "sender": [sender.id, sender.name, sender.avatar_id] if sender else None, "body": m.body,
                    "image_id": m.image_id, "created_at": m.created_at.isoformat(), "kind": m.kind},
        "conversation": {"id": c.id, "is_group": c.is_group, "name": c.name, "image_id": c.image_id,
                         "created_at": c.created_at.isoformat(), "last_message_id": c.last_message_id,
                         "last_message_at": c.last_message_at.isoformat(), "last_message_text": c.last_message_text,
                         "last_message_image": c.last_message_image},
        "members": [[s.user_id, s.hidden_through, s.unread] for s in event.members],
        "people": [[p.id, p.name, p.avatar_id] for p in event.people],
    }


def _decode_message(data: dict) -> MessageSent:
    m, c = data["message"], data["conversation"]
    message = MessageView(**{**m, "sender": Person(*m["sender"]) if m["sender"] else None,
                             "created_at": datetime.fromisoformat(m["created_at"])})
    conversation = ConversationView(**{**c, "created_at": datetime.fromisoformat(c["created_at"]),
                                       "last_message_at": datetime.fromisoformat(c["last_message_at"])})
    return MessageSent(message, conversation, [RecipientState(*row) for row in data["members"]],
                       [Person(*row) for row in data["people"]])


# -- emitting: after commit ------------------------------------------------------------------

_PENDING = "webchat_events"  # emitted in the open transaction
_COMMITTED = "webchat_events_committed"  # its transaction committed: to publish once it has ended


def emit(event: Event) -> None:
    """Publish the event when the session's transaction commits; at once if none is open.

    For a change the database holds. An event about nothing stored (a typing hint, a sign-out
    kept in Redis) is published with publish(): a read-only transaction is never committed.
    """
    session = db.session()
    if session.in_transaction():
        session.info.setdefault(_PENDING, []).append(event)
    else:
        publish(event)


@sa_event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    # Not published here: the session still holds its connection, and a publish is a network
    # round trip (measured: connections held that long made the pool overflow and reconnect,
    # -11% throughput). They go out in after_transaction_end, once the connection is back.
    pending = session.info.pop(_PENDING, None)
    if pending:
        session.info.setdefault(_COMMITTED, []).extend(pending)


@sa_event.listens_for(Session, "after_transaction_end")
def _publish_committed(session: Session, transaction) -> None:
    if transaction.parent is None and not transaction.nested:
        session.info.pop(_PENDING, None)  # what is still pending belonged to a rolled back transaction
        for event in session.info.pop(_COMMITTED, ()):
            publish(event)


# -- publishing: Redis pub/sub --------------------------------------------------------------

# Events that could not be published while Redis was away; sent first by the next publish.
_unsent: deque[str] = deque(maxlen=1000)
_unsent_lock = threading.Lock()


def publish(event: Event) -> bool:
    """Publish an event now; when Redis is down, keep it for later and carry on (the database stays the truth)."""
    payload = encode(event)
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
