"""Sending a message: check, write (one call on PostgreSQL), then the event after commit.

The write has two implementations with one result type (SendResult): webchat_send() in
migration 0003 on PostgreSQL, and the same steps as Core statements elsewhere. They must agree
row for row; tests/test_twins.py runs both on the same random histories and compares them.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from flask_babel import lazy_gettext as _l
from sqlalchemy import bindparam, case, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from ..events import ConversationView, MessageSent, MessageView, Person, RecipientState, emit
from ..extensions import db
from ..models import Conversation, Message, Unread, User, UTCDateTime, utcnow
from . import DomainError, NotFound, parse_id, sql_fast_paths, sync_loaded
from .images import has_file, store_upload
from .membership import as_active_member, get_conversation_for
from .message_text import preview_of
from .read_state import MemberState, member_states, recount_read_from
from .text_rules import visible_text

MAX_BODY = 4000
MAX_CLIENT_ID = 64


def check_message(body: str | None, image, client_id: str | None) -> tuple[str, str | None]:
    """Validate a message's parts and return the normalised body and client id."""
    if not isinstance(body, (str, type(None))) or not isinstance(client_id, (str, type(None))):
        raise DomainError(_l("body and client_id must be text."), 422)
    body = (body or "").strip()
    if "\x00" in body or "\x00" in (client_id or ""):
        raise DomainError(_l("Messages cannot contain NUL characters."), 422)
    if body and not visible_text(body).visible:
        body = ""  # zero-width spaces or bidi controls alone: nothing to read, as if empty
    if not body and not has_file(image):
        raise DomainError(_l("Write something or attach an image."), 422)
    if len(body) > MAX_BODY:
        raise DomainError(_l("Messages may be at most %(n)d characters.", n=MAX_BODY), 422)
    client_id = (client_id or "").strip() or None
    if client_id is not None and len(client_id) > MAX_CLIENT_ID:
        raise DomainError(_l("client_id may be at most %(n)d characters.", n=MAX_CLIENT_ID), 422)
    return body, client_id


@dataclass(frozen=True)
class SendResult:
    """What a send's write returns, whichever path ran (the columns of webchat_send()'s row)."""

    id: int
    moved_last: bool  # it became the conversation's last message
    moved_read: bool  # the sender's read pointer moved to it
    text_count: int  # the conversation's text messages now
    is_group: bool
    name: str | None
    image_id: str | None
    created_at: datetime  # the conversation's
    sender_name: str
    sender_avatar: str | None
    states: dict[int, MemberState]  # every member, read after the conversation's row was locked


_messages, _conversations, _unreads = Message.__table__, Conversation.__table__, Unread.__table__
# Bind names differ from column names (SQLAlchemy reserves those); a send passes them all.
_MESSAGE_COLUMNS = ("conversation_id", "sender_id", "kind", "body", "image_id", "client_id", "created_at")


def _moves(new_id, counted, conversation_id=bindparam("p_conversation_id")):
    """The two updates of a send's Python path, for a message id and its conversation.

    The conversation counts one more text message and moves its last message, unless a
    message with a larger id committed first (two senders racing): ids never go backwards. It
    returns its new text_count and whether the message became the newest ("moved"). The
    sender's pointer moves to the message, and their read_count becomes `counted`.
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


def _write_in_function(values: dict) -> SendResult:
    """Write the message with one call of webchat_send(), which also checks membership."""
    row = send_connection().execute(SEND_CALL, values).one_or_none()
    if row is None:
        raise NotFound(_l("No such conversation."))
    if not row.moved_last:
        # The function recounted the pointers past this message: loaded ones are stale. By
        # identity key: reading an expired object's attributes would query (and may fail).
        cid = values["p_conversation_id"]
        for key, obj in list(db.session.identity_map.items()):
            if key[0] is Unread and key[1][0] == cid:
                db.session.expire(obj)
    states = {uid: MemberState(hidden, unread, name, avatar) for uid, hidden, unread, name, avatar in row.states}
    return SendResult(**{**row._asdict(), "states": states})


def _write_in_python(values: dict, sender: User | None, conversation: Conversation | None) -> SendResult:
    """Write the message as webchat_send() does, statement by statement (SQLite, or SQL_FAST_PATHS off)."""
    cid = values["p_conversation_id"]
    if sender is None or conversation is None:
        conversation, membership = get_conversation_for(values["p_sender_id"], cid, with_user=True)
        sender = membership.user
    if sender.is_disabled:
        raise NotFound(_l("No such conversation."))
    conn = db.session.connection()
    mid = conn.execute(_INSERT, values).scalar_one()
    values = {**values, "p_mid": mid}
    _, text_count, moved_last = conn.execute(_MOVE_LAST, values).one()
    moved_read = conn.execute(_MOVE_READ, {**values, "p_read_count": text_count}).rowcount
    if not moved_last:
        # A message with a larger id committed first: pointers already past this one (the
        # sender's too) count it now.
        recount_read_from(cid, mid)
    return SendResult(mid, bool(moved_last), bool(moved_read), text_count, conversation.is_group, conversation.name,
                      conversation.image_id, conversation.created_at, sender.name, sender.avatar_id,
                      member_states(cid))


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
            # Give the connection back while the image waits its turn and decodes (seconds for a
            # big one); on PostgreSQL the write checks membership again.
            db.session.commit()
            return send_message(membership.user, conversation, body, image, client_id)
        return _send(user_id, cid, body, image, client_id)


def _message_sent(message: Message, result: SendResult) -> MessageSent:
    """The event of a new message: everything every process needs to push it, read once by the send.

    A 1:1's two members travel with their names and avatars (each row shows the other person).
    A listener then renders and writes without a query, and a process holding none of the
    members does nothing at all.
    """
    created_at = message.created_at
    view = MessageView(message.id, message.conversation_id, message.sender_id,
                       Person(message.sender_id, result.sender_name, result.sender_avatar), message.body,
                       message.image_id, created_at)
    conversation = ConversationView(message.conversation_id, result.is_group, result.name, result.image_id,
                                    result.created_at, message.id, created_at, preview_of(message),
                                    bool(message.image_id) and not message.body)
    members = [RecipientState(uid, s.hidden_through, s.unread) for uid, s in result.states.items()]
    people = [] if result.is_group else [Person(uid, s.name, s.avatar_id) for uid, s in result.states.items()]
    return MessageSent(view, conversation, members, people)


def _send(sender_id: int, conversation_id: int, body: str | None, image, client_id: str | None, *,
          sender: User | None = None, conversation: Conversation | None = None) -> tuple[Message, bool]:
    """Send a text and/or image message; return it and whether it is new.

    Writes a constant number of rows whatever the group size: the message (and its image),
    the conversation's last-message columns and the sender's own read pointer, and reads every
    member's unread count for the event. A repeated client_id is caught by the unique
    constraint, so the usual send does not look first.
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
        values = {"p_conversation_id": conversation_id, "p_sender_id": sender_id, "p_kind": "text", "p_body": body,
                  "p_image_id": message.image_id, "p_client_id": client_id, "p_created_at": message.created_at,
                  "p_text": preview, "p_image_only": image_only}
        result = _write_in_function(values) if sql_fast_paths() else _write_in_python(values, sender, conversation)
        message.id = result.id
        sync_loaded(Conversation, conversation_id, {"text_count": result.text_count})
        if result.moved_last:
            sync_loaded(Conversation, conversation_id, {
                "last_message_id": message.id, "last_message_text": preview, "last_message_image": image_only,
                "last_message_at": message.created_at})
            if result.moved_read:
                sync_loaded(Unread, (conversation_id, sender_id), {
                    "last_read_message_id": message.id, "read_at": message.created_at,
                    "read_count": result.text_count})
        emit(_message_sent(message, result))
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
    set_committed_value(message, "sender", _known_sender(sender, sender_id, result))
    return message, True


def _known_sender(sender: User | None, sender_id: int, result: SendResult) -> User:
    """The sender for the reply's fragment, without reading their row: the write returned name and avatar."""
    sender = sender or db.session.identity_map.get(db.session.identity_key(User, sender_id))
    if sender is None:
        sender = User(id=sender_id, name=result.sender_name, avatar_id=result.sender_avatar)
        make_transient_to_detached(sender)
        db.session.add(sender)
    return sender


def _existing(sender_id: int, conversation_id: int, client_id: str) -> Message | None:
    return db.session.scalar(select(Message).where(
        Message.sender_id == sender_id, Message.conversation_id == conversation_id, Message.client_id == client_id))
