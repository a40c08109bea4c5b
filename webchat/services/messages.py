"""Messages: sending (check, then do, then publish), pages of history and replay."""
from __future__ import annotations

from datetime import timedelta

from flask_babel import force_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from sqlalchemy import and_, bindparam, case, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from ..extensions import db
from ..models import Conversation, Membership, Message, Unread, User, UTCDateTime, utcnow
from . import MAX_ID, DomainError, NotFound, as_active_member, parse_id, sync_loaded
from .conversations import MemberState, get_conversation_for, member_states, recount_read_from
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


def _delivery(message: Message, target: dict, states: dict[int, MemberState]) -> dict:
    """Return everything every process needs to push a new message, read once by the send.

    The message's fields, the conversation's list-row fields and each member's state (hidden
    position and exact unread count; for a 1:1 also name and avatar, since each row shows the
    other person) travel in the event. A listener then renders and writes without a query, and
    a process holding none of the members does nothing at all.
    """
    people = [] if target["is_group"] else [[uid, s.name, s.avatar_id] for uid, s in states.items()]
    return {
        "type": "message", "cid": message.conversation_id, "mid": message.id, "members": list(states),
        "states": [[uid, s.hidden_through, s.unread] for uid, s in states.items()], "people": people,
        "m": {"sender_id": message.sender_id, "sender_name": target["sender_name"],
              "sender_avatar": target["sender_avatar"], "body": message.body, "image_id": message.image_id,
              "created_at": message.created_at.isoformat()},
        "c": {"is_group": target["is_group"], "name": target["name"], "image_id": target["image_id"],
              "created_at": target["created_at"].isoformat(), "text": preview_of(message),
              "image": bool(message.image_id) and not message.body},
    }


_messages, _conversations, _unreads = Message.__table__, Conversation.__table__, Unread.__table__
# Bind names differ from column names (SQLAlchemy reserves those); a send passes them all.
_MESSAGE_COLUMNS = ("conversation_id", "sender_id", "kind", "body", "image_id", "client_id", "created_at")


def _moves(new_id, counted, conversation_id=bindparam("p_conversation_id")):
    """The two updates of a send on SQLite, for a message id and its conversation.

    The conversation counts one more text message and moves its last message, unless a
    message with a larger id committed first (two senders racing): ids never go backwards. It
    returns its new text_count and whether the message became the newest ("moved"). The
    sender's pointer moves to the message, and their read_count becomes `counted`.
    PostgreSQL runs the same steps in webchat_send() (migration 0003).
    """
    newer = or_(_conversations.c.last_message_id.is_(None), _conversations.c.last_message_id < new_id)

    def if_newer(value, column):
        return case((newer, value), else_=_conversations.c[column])

    last = (
        update(_conversations)
        .where(_conversations.c.id == conversation_id)
        .values(text_count=_conversations.c.text_count + 1,
                last_message_id=if_newer(new_id, "last_message_id"),
                last_message_text=if_newer(bindparam("p_text"), "last_message_text"),
                last_message_image=if_newer(bindparam("p_image_only"), "last_message_image"),
                last_message_at=if_newer(bindparam("p_created_at"), "last_message_at"))
        .returning(_conversations.c.id, _conversations.c.text_count,
                   (_conversations.c.last_message_id == new_id).label("moved"))
    )
    read = (
        update(_unreads)
        .where(_unreads.c.conversation_id == conversation_id,
               _unreads.c.user_id == bindparam("p_sender_id"), _unreads.c.last_read_message_id < new_id)
        .values(last_read_message_id=new_id, read_at=bindparam("p_created_at"), read_count=counted)
    )
    return last, read


# PostgreSQL: the whole send is one call of the function migration 0003 creates (one round trip).
SEND_CALL = text(
    "SELECT * FROM webchat_send(CAST(:p_conversation_id AS integer), CAST(:p_sender_id AS integer), "
    "CAST(:p_body AS text), CAST(:p_image_id AS varchar), CAST(:p_client_id AS varchar), "
    "CAST(:p_created_at AS timestamptz), CAST(:p_text AS varchar), CAST(:p_image_only AS boolean))"
).bindparams(bindparam("p_created_at", type_=UTCDateTime)).columns(created_at=UTCDateTime)
_INSERT = (insert(_messages).values({name: bindparam(f"p_{name}") for name in _MESSAGE_COLUMNS})
           .returning(_messages.c.id))
_MOVE_LAST, _MOVE_READ = _moves(bindparam("p_mid"), bindparam("p_read_count"))


def send_connection():
    """The connection a PostgreSQL send runs on: in autocommit when the session has nothing open.

    Then webchat_send() is its own transaction: the send costs one round trip, with no BEGIN
    or COMMIT, and the conversation's row lock lasts only while the server runs the function.
    A session already in a transaction (a send with an image, whose row comes first) runs the
    function in it and commits as usual.
    """
    if db.session().in_transaction():
        return db.session.connection()
    return db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def _write(values: dict, sender: User | None,
           conversation: Conversation | None) -> tuple[int, bool, bool, dict, dict[int, MemberState]]:
    """Write a message, count it, and move the conversation's last message and the sender's pointer.

    Returns the new id, whether each update moved, the conversation's new text_count and its
    and the sender's fields for the push, and every member's state (exact unread count) read
    after the conversation's row was locked. Core statements (or the function) on the session's
    connection, without the ORM's unit of work: this is every send's cost. On PostgreSQL the
    membership check is part of the function; elsewhere the caller passes the checked sender
    and conversation.
    """
    cid = values["p_conversation_id"]
    if db.session.get_bind().dialect.name == "postgresql":
        row = send_connection().execute(SEND_CALL, values).one_or_none()
        if row is None:
            raise NotFound(_l("No such conversation."))
        if not row.moved_last:
            # The function recounted the pointers past this message: loaded ones are stale. By
            # identity key: reading an expired object's attributes would query (and may fail).
            for key, obj in list(db.session.identity_map.items()):
                if key[0] is Unread and key[1][0] == cid:
                    db.session.expire(obj)
        states = {uid: MemberState(hidden, unread, name, avatar) for uid, hidden, unread, name, avatar in row.states}
        return row.id, row.moved_last, row.moved_read, row._asdict(), states
    conn = db.session.connection()
    if sender is None or conversation is None:
        conversation, membership = get_conversation_for(values["p_sender_id"], cid, with_user=True)
        sender = membership.user
    if sender.is_disabled:
        raise NotFound(_l("No such conversation."))
    mid = conn.execute(_INSERT, values).scalar_one()
    values = {**values, "p_mid": mid}
    _, text_count, moved_last = conn.execute(_MOVE_LAST, values).one()
    moved_read = conn.execute(_MOVE_READ, {**values, "p_read_count": text_count}).rowcount
    if not moved_last:
        # A message with a larger id committed first: pointers already past this one (the
        # sender's too) count it now.
        recount_read_from(cid, mid)
    target = {
        "text_count": text_count, "is_group": conversation.is_group, "name": conversation.name,
        "image_id": conversation.image_id, "created_at": conversation.created_at, "sender_name": sender.name,
        "sender_avatar": sender.avatar_id}
    return mid, bool(moved_last), bool(moved_read), target, member_states(cid)


def send_message(sender: User, conversation: Conversation, body: str | None, image=None,
                 client_id: str | None = None) -> tuple[Message, bool]:
    """Send a text and/or image message as a member; return it and whether it is new."""
    return _send(sender.id, conversation.id, body, image, client_id, sender=sender, conversation=conversation)


def send_to(user_id: int, conversation_id, body: str | None, image=None,
            client_id: str | None = None) -> tuple[Message, bool]:
    """Send to a conversation by id, checking that the user is an active member.

    A non-member gets NotFound; a disabled or deleted account, AccountClosed.

    The routes and socket frames send this way: on PostgreSQL the check costs no query of its
    own, it is part of the send's statement. With an image it comes first: nobody gets an
    upload decoded for a conversation they are not in.
    """
    cid = parse_id(conversation_id, _l("No such conversation."))
    with as_active_member(user_id):  # a disabled or deleted sender: AccountClosed
        if has_file(image):
            conversation, membership = get_conversation_for(user_id, cid, with_user=True)
            return send_message(membership.user, conversation, body, image, client_id)
        return _send(user_id, cid, body, image, client_id)


def _send(sender_id: int, conversation_id: int, body: str | None, image, client_id: str | None, *,
          sender: User | None = None, conversation: Conversation | None = None) -> tuple[Message, bool]:
    """Send a text and/or image message; return it and whether it is new.

    Writes a constant number of rows whatever the group size: the message (and its image),
    the conversation's last-message columns and the sender's own read pointer. Then one query
    reads what the push needs (every member's unread count), so listeners need none. A repeated
    client_id is caught by the unique constraint, so the usual send does not look first.
    """
    body, client_id = check_message(body, image, client_id)
    try:
        image_row = None
        if has_file(image):
            image_row = store_upload(image, conversation_id=conversation_id)
            db.session.flush()  # the message refers to it
        message = Message(conversation_id=conversation_id, sender_id=sender_id, kind="text", event=None, body=body,
                          image_id=image_row.id if image_row else None, client_id=client_id, created_at=utcnow())
        preview, image_only = preview_of(message), bool(image_row) and not body
        message.id, moved_last, moved_read, target, states = _write({
            "p_conversation_id": conversation_id, "p_sender_id": sender_id, "p_kind": "text", "p_body": body,
            "p_image_id": message.image_id, "p_client_id": client_id, "p_created_at": message.created_at,
            "p_text": preview, "p_image_only": image_only}, sender, conversation)
        sync_loaded(Conversation, conversation_id, {"text_count": target["text_count"]})
        if moved_last:
            sync_loaded(Conversation, conversation_id, {
                "last_message_id": message.id, "last_message_text": preview, "last_message_image": image_only,
                "last_message_at": message.created_at})
            if moved_read:
                sync_loaded(Unread, (conversation_id, sender_id), {
                    "last_read_message_id": message.id, "read_at": message.created_at,
                    "read_count": target["text_count"]})
        event = _delivery(message, target, states)
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
    # Written without the ORM: hand the session the row as it is in the database (no reload).
    make_transient_to_detached(message)
    db.session.add(message)
    # The fragment shows the sender's name and avatar, which the statement returned: no read of
    # the user's row for them (its other columns load if anything asks).
    sender = sender or db.session.identity_map.get(db.session.identity_key(User, sender_id))
    if sender is None:
        sender = User(id=sender_id, name=target["sender_name"], avatar_id=target["sender_avatar"])
        make_transient_to_detached(sender)
        db.session.add(sender)
    set_committed_value(message, "sender", sender)
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
    return db.session.scalar(
        select(func.coalesce(func.max(Conversation.last_message_id), 0))
        .join(Membership, Membership.conversation_id == Conversation.id)
        .where(Membership.user_id == user_id)
    ) or 0
