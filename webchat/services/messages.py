"""Messages: sending (check, then do, then publish), pages of history and replay."""
from __future__ import annotations

from datetime import timedelta

from flask_babel import force_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload

from ..extensions import db
from ..models import Conversation, Membership, Message, Unread, User, utcnow
from . import MAX_ID, DomainError, NotFound, sync_loaded
from .images import has_file, store_upload

MAX_BODY = 4000
MAX_CLIENT_ID = 64
PAGE_SIZE = 50
# A message can commit after one with a larger id (ids are taken at insert, not at commit);
# replay looks back this far before the client's newest id so a late committer is not lost.
REPLAY_LOOKBACK = timedelta(seconds=30)


def system_text(message: Message) -> str:
    """Return the human text of a system line in the current locale."""
    actor = message.sender.name if message.sender else _("Someone")
    texts = {
        "created": _("%(actor)s created the group “%(name)s”", actor=actor, name=message.body),
        "added": _("%(actor)s added %(names)s", actor=actor, names=message.body),
        "removed": _("%(actor)s removed %(name)s", actor=actor, name=message.body),
        "left": _("%(name)s left the group", name=message.body or actor),
        "renamed": _("%(actor)s renamed the group to “%(name)s”", actor=actor, name=message.body),
    }
    return texts.get(message.event or "", message.body)


def preview_of(message: Message) -> str:
    """Return the list-row preview of a message (stored, so in the server's default locale)."""
    if message.kind == "system":
        with force_locale("en"):
            return system_text(message)[:200]
    return " ".join(message.body.split())[:200]


def check_message(body: str | None, image, client_id: str | None) -> tuple[str, str | None]:
    """Validate a message's parts and return the normalised body and client id."""
    if not isinstance(body, (str, type(None))) or not isinstance(client_id, (str, type(None))):
        raise DomainError(_l("body and client_id must be text."), 422)
    body = (body or "").strip()
    if "\x00" in body or "\x00" in (client_id or ""):
        raise DomainError(_l("Messages cannot contain NUL characters."), 422)
    if not body and not has_file(image):
        raise DomainError(_l("Write something or attach an image."), 422)
    if len(body) > MAX_BODY:
        raise DomainError(_l("Messages may be at most %(n)d characters.", n=MAX_BODY), 422)
    client_id = (client_id or "").strip() or None
    if client_id is not None and len(client_id) > MAX_CLIENT_ID:
        raise DomainError(_l("client_id may be at most %(n)d characters.", n=MAX_CLIENT_ID), 422)
    return body, client_id


def _existing(sender_id: int, conversation_id: int, client_id: str) -> Message | None:
    return db.session.scalar(select(Message).where(
        Message.sender_id == sender_id, Message.conversation_id == conversation_id, Message.client_id == client_id))


def _delivery(message: Message, conversation: Conversation, sender: User) -> dict:
    """Return everything every process needs to push a new message, read once here.

    The message's fields, the conversation's list-row fields and each member's state (hidden
    position and exact unread count; for a 1:1 also name and avatar, since each row shows the
    other person) travel in the event. A listener then renders and writes without a query, and
    a process holding none of the members does nothing at all.
    """
    from .conversations import member_states

    states = member_states(conversation.id)
    people = [] if conversation.is_group else [[uid, s.name, s.avatar_id] for uid, s in states.items()]
    return {
        "type": "message", "cid": conversation.id, "mid": message.id, "members": list(states),
        "states": [[uid, s.hidden_through, s.unread] for uid, s in states.items()], "people": people,
        "m": {"sender_id": sender.id, "sender_name": sender.name, "sender_avatar": sender.avatar_id,
              "body": message.body, "image_id": message.image_id, "created_at": message.created_at.isoformat()},
        "c": {"is_group": conversation.is_group, "name": conversation.name, "image_id": conversation.image_id,
              "created_at": conversation.created_at.isoformat(), "text": preview_of(message),
              "image": bool(message.image_id) and not message.body},
    }


def send_message(sender: User, conversation: Conversation, body: str | None, image=None,
                 client_id: str | None = None) -> tuple[Message, bool]:
    """Send a text and/or image message; return it and whether it is new.

    Writes a constant number of rows whatever the group size: the message (and its image),
    the conversation's last-message columns and the sender's own read pointer. Then one query
    reads what the push needs (every member's unread count), so listeners need none. A repeated
    client_id is caught by the unique constraint, so the usual send does not look first.
    """
    body, client_id = check_message(body, image, client_id)
    # Plain values first: after a rollback the ORM objects would reload them.
    conversation_id, sender_id = conversation.id, sender.id
    try:
        image_row = store_upload(image, conversation_id=conversation_id) if has_file(image) else None
        message = Message(conversation_id=conversation_id, sender_id=sender_id, kind="text", body=body,
                          image_id=image_row.id if image_row else None, client_id=client_id, created_at=utcnow())
        db.session.add(message)
        db.session.flush()
        # Conditional, so that two senders committing out of id order never move it backwards.
        last = {"last_message_id": message.id, "last_message_text": preview_of(message),
                "last_message_image": bool(image_row) and not body, "last_message_at": message.created_at}
        if db.session.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id,
                   or_(Conversation.last_message_id.is_(None), Conversation.last_message_id < message.id))
            .values(**last).execution_options(synchronize_session=False)
        ).rowcount:
            sync_loaded(Conversation, conversation_id, last)
        read = {"last_read_message_id": message.id, "read_at": message.created_at}
        if db.session.execute(
            update(Unread)
            .where(Unread.conversation_id == conversation_id, Unread.user_id == sender_id,
                   Unread.last_read_message_id < message.id)
            .values(**read).execution_options(synchronize_session=False)
        ).rowcount:
            sync_loaded(Unread, (conversation_id, sender_id), read)
        event = _delivery(message, conversation, sender)
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        # The same client_id was sent before (a retry, another tab): return the message made then.
        existing = _existing(sender_id, conversation_id, client_id) if client_id else None
        if existing is None:
            raise
        return existing, False
    except Exception:
        db.session.rollback()
        raise
    from ..realtime import bus

    bus.publish(event)
    return message, True


def messages_page(conversation_id: int, before=None, limit: int = PAGE_SIZE) -> list[Message]:
    """Return up to `limit` messages older than `before` (or the newest), oldest first."""
    query = (
        select(Message).options(joinedload(Message.sender))
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.id.desc()).limit(limit)
    )
    if before is not None:
        try:
            before_id = int(before)
        except (TypeError, ValueError, OverflowError):
            raise DomainError(_l("'before' must be a message of this conversation."), 400)
        if not 0 < before_id <= MAX_ID:
            raise NotFound(_l("'before' must be a message of this conversation."))
        exists = db.session.scalar(select(Message.id).where(
            Message.id == before_id, Message.conversation_id == conversation_id))
        if exists is None:
            raise NotFound(_l("'before' must be a message of this conversation."))
        query = query.where(Message.id < before_id)
    return list(reversed(db.session.scalars(query).all()))


def messages_for_replay(user_id: int, after: int, limit: int = 500, lookback: bool = True) -> list[Message]:
    """Return messages newer than `after` in the user's conversations, oldest first.

    Also returns messages a little older than `after` that were created within the lookback
    window of it: they may have committed after the client saw `after`. Clients skip ids they have.
    """
    anchor = db.session.scalar(select(Message.created_at).where(Message.id == after)) if after and lookback else None
    newer = Message.id > after
    if anchor is not None:
        newer = or_(newer, and_(Message.id < after, Message.created_at >= anchor - REPLAY_LOOKBACK))
    return list(db.session.scalars(
        select(Message).options(joinedload(Message.sender))
        .join(Membership, and_(Membership.conversation_id == Message.conversation_id,
                               Membership.user_id == user_id))
        .where(newer)
        .order_by(Message.id).limit(limit)
    ).all())


def newest_message_id(user_id: int) -> int:
    """Return the largest message id in the user's conversations (0 if none)."""
    from sqlalchemy import func

    return db.session.scalar(
        select(func.coalesce(func.max(Conversation.last_message_id), 0))
        .join(Membership, Membership.conversation_id == Conversation.id)
        .where(Membership.user_id == user_id)
    ) or 0
