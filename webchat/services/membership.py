"""Who may act in a conversation: the one membership check, and the row locks changes take."""
from __future__ import annotations

from contextlib import contextmanager

from flask_babel import lazy_gettext as _l
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from ..extensions import db
from ..models import Conversation, Membership, Unread, User
from . import AccountClosed, NotFound, parse_id


def member_pairs(user_id: int):
    """Select (conversation, membership) pairs of the conversations this user belongs to."""
    return (
        select(Conversation, Membership)
        .join(Membership, Membership.conversation_id == Conversation.id)
        .where(Membership.user_id == user_id)
    )


def get_conversation_for(user_id: int, cid, *, with_user: bool = False,
                         with_unread: bool = False) -> tuple[Conversation, Membership]:
    """Return the conversation and the user's membership, or raise NotFound for non-members.

    `with_user` loads the member's user in the same query (membership.user), for callers
    that have no user loaded yet, such as a socket's frames; `with_unread` their read pointer
    (membership.unread), for a page that marks the conversation read.
    """
    cid = parse_id(cid, _l("No such conversation."))
    query = member_pairs(user_id).where(Conversation.id == cid)
    if with_user:
        query = query.options(joinedload(Membership.user, innerjoin=True))
    if with_unread:
        query = query.options(joinedload(Membership.unread))
    row = db.session.execute(query).first()
    if row is None:
        # Same answer whether it does not exist or the user is not in it.
        raise NotFound(_l("No such conversation."))
    return row[0], row[1]


def is_active(user_id: int) -> bool:
    """Say whether this account still exists and is not disabled."""
    user = db.session.get(User, user_id)
    return user is not None and not user.is_disabled


@contextmanager
def as_active_member(user_id: int):
    """Run a member's action; a refusal because the account itself is closed becomes AccountClosed.

    NotFound stays the answer for a non-member. Paths that act on a user id without loading the
    user (a send, a socket frame) learn this way that the account is gone, even when the event
    that should have closed its sockets was lost. The account is looked up only on a refusal.
    """
    try:
        yield
    except NotFound:
        if not is_active(user_id):
            raise AccountClosed(_l("Please sign in.")) from None
        raise


def get_active_membership(user_id: int, cid) -> tuple[Conversation, Membership]:
    """get_conversation_for with the member's user, for callers holding only a user id (socket
    frames): NotFound for a non-member, AccountClosed for a disabled or deleted account."""
    with as_active_member(user_id):
        conversation, membership = get_conversation_for(user_id, cid, with_user=True)
    if membership.user.is_disabled:
        raise AccountClosed(_l("Please sign in."))
    return conversation, membership


def lock_conversations(conversation_ids, *, share: bool = False) -> None:
    """Lock these conversations' rows until the transaction ends, in id order (no commit).

    What changes the unread counters takes its conversation's row first, as a send does by
    updating it: a read (`share`) waits for sends in flight and sends wait for it, so each
    computes its counter from a snapshot that has the others' messages; deletions and system
    lines hold it exclusively. One order everywhere (conversation, then members' rows, lowest
    id first) keeps them from deadlocking. PostgreSQL only: SQLite runs one writer at a time.
    """
    ids = sorted(set(conversation_ids))
    if ids and db.session.get_bind().dialect.name == "postgresql":
        db.session.execute(select(Conversation.id).where(Conversation.id.in_(ids)).order_by(Conversation.id)
                           .with_for_update(read=share, key_share=not share))


def add_member(conversation: Conversation, user_id: int, role: str = "member") -> Membership:
    """Add a membership (uncommitted) whose read pointer starts at the conversation's newest message."""
    membership = Membership(conversation=conversation, user_id=user_id, role=role)
    # New members start with everything so far read: no badge for history. Their read_count is
    # 0 here (plain values, so several members go in one executemany); a conversation that has
    # messages recounts them after the insert (groups.add_members: one statement for all).
    membership.unread = Unread(user_id=user_id, last_read_message_id=conversation.last_message_id or 0, read_count=0)
    db.session.add(membership)
    return membership


def members_of(conversation_id: int) -> list[tuple[Membership, User]]:
    """Return a conversation's members with their users, owner first."""
    rows = db.session.execute(
        select(Membership, User).join(User, User.id == Membership.user_id)
        .where(Membership.conversation_id == conversation_id)
        .order_by((Membership.role == "owner").desc(), Membership.joined_at, User.id)
    ).all()
    return [(m, u) for m, u in rows]
