"""Read state: exact unread counts kept as counters, read pointers, and keeping both right.

A member's unread count is the conversation's text_count less their read_count (models.Unread):
reading it costs the same however many messages are unread, and a send writes no row for the
recipients. Everything that adds, reads or deletes text messages keeps the two counters exact.
"""
from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import and_, bindparam, case, func, or_, select, update

from ..events import ConversationRead, emit
from ..extensions import db
from ..models import Conversation, Membership, Message, Unread, User, utcnow
from . import sync_loaded, transaction
from .membership import lock_conversations


def unread_count():
    """A member's exact unread count (an Unread row joined to its Conversation), as an SQL expression."""
    unread = Conversation.text_count - Unread.read_count
    return case((unread > 0, unread), else_=0)


def _read_by_member():
    """A text message counts as read by a member (an Unread row): up to their pointer, or their own."""
    return or_(Message.id <= Unread.last_read_message_id, Message.sender_id == Unread.user_id)


def read_count_at(conversation_id, pointer, user_id):
    """How many of a conversation's text messages a member has read at `pointer` (an SQL expression).

    Read means up to the pointer, or their own. It is the conversation's text_count less the
    others' texts after the pointer, read in one snapshot. A pointer moves to a recent message,
    so few come after it: this does not count the history.
    """
    total = select(Conversation.text_count).where(Conversation.id == conversation_id).scalar_subquery()
    after = (select(func.count()).select_from(Message)
             .where(Message.conversation_id == conversation_id, Message.kind == "text", Message.id > pointer,
                    Message.sender_id != user_id)
             .scalar_subquery())
    return total - after


def recount_read(conversation_id: int, which) -> None:
    """Set read_count from the pointer for the conversation's members matching `which` (one statement)."""
    recounted = db.session.execute(
        update(Unread)
        .where(Unread.conversation_id == conversation_id, which)
        .values(read_count=read_count_at(conversation_id, Unread.last_read_message_id, Unread.user_id))
        .returning(Unread.user_id, Unread.last_read_message_id, Unread.read_count)
        .execution_options(synchronize_session=False)
    ).all()
    for uid, pointer, read_count in recounted:
        sync_loaded(Unread, (conversation_id, uid), {"last_read_message_id": pointer, "read_count": read_count})


def recount_read_from(conversation_id: int, message_id: int) -> None:
    """Recount read_count of the members whose pointer is at or past `message_id` (no commit).

    A message that commits after one with a larger id lands behind pointers that had already
    moved past it; their read counts now include one more message. Rare (two senders racing in
    one conversation), so a send whose message did not become the newest runs this.
    """
    recount_read(conversation_id, Unread.last_read_message_id >= message_id)


def forget_texts(condition) -> None:
    """Take the messages matching `condition` out of the unread counters; call before deleting them.

    Each conversation loses them from its text_count, each member from their read_count those
    they had read (at or before their pointer, or their own): unread counts stay exact after
    retention and account deletion. No commit. The conversations are locked first (see
    lock_conversations), then two statements, whatever the number of messages or members.
    Retention's PostgreSQL batch (retention._PG_BATCH) does the same in its statement; a test
    compares the two (tests/test_twins.py).
    """
    texts = and_(condition, Message.kind == "text")
    touched = select(Message.conversation_id).where(texts)
    lock_conversations(db.session.scalars(touched.distinct()).all())
    db.session.execute(
        update(Conversation).where(Conversation.id.in_(touched))
        .values(text_count=Conversation.text_count - select(func.count()).select_from(Message).where(
            texts, Message.conversation_id == Conversation.id).scalar_subquery())
        .execution_options(synchronize_session=False)
    )
    db.session.execute(
        update(Unread).where(Unread.conversation_id.in_(touched))
        .values(read_count=Unread.read_count - select(func.count()).select_from(Message).where(
            texts, Message.conversation_id == Unread.conversation_id, _read_by_member()).scalar_subquery())
        .execution_options(synchronize_session=False)
    )


def recount_unread(conversation_ids=None) -> None:
    """Recompute the unread counters from the messages (all conversations, or these); no commit.

    For rows written around the services (bulk loads, a repair): it counts every message, so
    nothing on a request path calls it.
    """
    texts = select(func.count()).select_from(Message).where(
        Message.conversation_id == Conversation.id, Message.kind == "text").scalar_subquery()
    read = select(func.count()).select_from(Message).where(
        Message.conversation_id == Unread.conversation_id, Message.kind == "text", _read_by_member()).scalar_subquery()
    conversations, unreads = update(Conversation).values(text_count=texts), update(Unread).values(read_count=read)
    if conversation_ids is not None:
        ids = list(conversation_ids)
        conversations = conversations.where(Conversation.id.in_(ids))
        unreads = unreads.where(Unread.conversation_id.in_(ids))
    db.session.execute(conversations.execution_options(synchronize_session=False))
    db.session.execute(unreads.execution_options(synchronize_session=False))


def unread_counts(user_id: int, conversation_ids=None) -> dict[int, int]:
    """Return exact unread counts by conversation for a user (only those above zero)."""
    query = (
        select(Unread.conversation_id, unread_count())
        .join(Conversation, Conversation.id == Unread.conversation_id)
        .where(Unread.user_id == user_id, Conversation.text_count > Unread.read_count)
    )
    if conversation_ids is not None:
        query = query.where(Unread.conversation_id.in_(list(conversation_ids)))
    return {cid: count for cid, count in db.session.execute(query)}


class MemberState(NamedTuple):
    """A member's list state: hidden position, exact unread count, and who they are."""

    hidden_through: int | None
    unread: int
    name: str
    avatar_id: str | None


# Built once: every send on SQLite runs it, and building a statement costs more than running it.
MEMBER_STATES = (
    select(Membership.user_id, Membership.hidden_through, unread_count(), User.name, User.avatar_id)
    .join(Unread, and_(Unread.conversation_id == Membership.conversation_id, Unread.user_id == Membership.user_id))
    .join(Conversation, Conversation.id == Membership.conversation_id)
    .join(User, User.id == Membership.user_id)
    .where(Membership.conversation_id == bindparam("cid"))
)


def member_states(cid: int) -> dict[int, MemberState]:
    """Return every member's hidden state, exact unread count, name and avatar, in one query.

    A send runs it after its writes, in the same transaction, and the message's event carries
    the result: the processes that push the message then need no query at all. Run after the
    conversation row is locked by the send's update, it counts every message committed before
    this one's (senders to one conversation commit one at a time).
    """
    # On the session's connection (its transaction), without the ORM's statement handling.
    rows = db.session.connection().execute(MEMBER_STATES, {"cid": cid}).all()
    return {uid: MemberState(*state) for uid, *state in rows}


def mark_read(user_id: int, conversation: Conversation, upto: int | None = None, *, notify: bool = True,
              unread: Unread | None = None) -> bool:
    """Move the user's read pointer to the newest message (or upto); return whether it moved.

    Given the member's Unread row as loaded with the conversation, a pointer already that far
    (a conversation opened again) issues no statement at all: the update would match no row.
    """
    target = upto if upto is not None else (conversation.last_message_id or 0)
    if unread is not None and unread.last_read_message_id >= target:
        return False
    return user_id in mark_read_for(conversation.id, [user_id], target, notify=notify)


def mark_read_for(cid: int, user_ids, upto: int, *, notify: bool = True) -> set[int]:
    """Move these members' read pointers up to message `upto` in one statement; return who moved.

    Each member whose pointer moved gets a read event (after the commit), so their other tabs
    clear the badge.
    """
    user_ids = [int(u) for u in user_ids]
    if not user_ids:
        return set()
    values = {"last_read_message_id": upto, "read_at": utcnow()}
    with transaction():
        lock_conversations([cid], share=True)  # sends in flight commit first: their messages are counted
        moved = dict(db.session.execute(
            update(Unread)
            .where(Unread.conversation_id == cid, Unread.user_id.in_(user_ids),
                   Unread.last_read_message_id < upto)
            .values(**values, read_count=read_count_at(cid, upto, Unread.user_id))
            .returning(Unread.user_id, Unread.read_count).execution_options(synchronize_session=False)
        ).all())
        if notify:
            for uid in sorted(moved):
                emit(ConversationRead(cid, uid))
    for uid, read_count in moved.items():
        sync_loaded(Unread, (cid, uid), {**values, "read_count": read_count})
    return set(moved)
