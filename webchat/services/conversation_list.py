"""The conversation list: its rows (name, picture, last message, exact badge), a page at a time."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from flask_babel import lazy_gettext as _l
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import joinedload

from ..extensions import db
from ..models import Conversation, Membership, Message, Unread, User
from . import DomainError, parse_id
from .membership import member_pairs
from .message_text import system_text
from .read_state import unread_count

LIST_PAGE = 50  # rows per page of the conversation list
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CURSOR = re.compile(r"(\d{1,18})-(\d{1,19})")


@dataclass
class ConversationRow:
    """One row of a user's conversation list.

    `conversation` is a models.Conversation, or an events.ConversationView with the same
    attributes when a live frame renders the row from a message's event.
    """

    conversation: Conversation
    title: str
    image_id: str | None
    peer: User | None
    unread: int
    system_message: Message | None = None  # the last message, when it is a system line

    @property
    def preview(self) -> str:
        """Return the last message's preview, translating system lines for the viewer."""
        if self.system_message is not None:
            return system_text(self.system_message)
        return self.conversation.last_message_text

    @property
    def id(self) -> int:
        return self.conversation.id

    @property
    def sort_time(self) -> datetime:
        return self.conversation.last_message_at or self.conversation.created_at

    @property
    def sort_key(self) -> int:
        """Return the list's sort time in microseconds (rows carry it so the page can keep the order)."""
        return (self.sort_time - _EPOCH) // timedelta(microseconds=1)


def make_row(conversation, peer, unread: int, system_message: Message | None = None) -> ConversationRow:
    """Build a list row: a group shows its name and picture, a 1:1 the other person (or "Deleted user")."""
    if conversation.is_group:
        return ConversationRow(conversation, conversation.name or "", conversation.image_id, None, unread,
                               system_message)
    title = peer.name if peer else str(_l("Deleted user"))
    return ConversationRow(conversation, title, peer.avatar_id if peer else None, peer, unread, system_message)


def _system_last_messages(message_ids: list[int]) -> dict[int, Message]:
    """Return the system lines among these messages (with their actors), by id, in one query."""
    if not message_ids:
        return {}
    rows = db.session.scalars(select(Message).options(joinedload(Message.sender)).where(
        Message.id.in_(message_ids), Message.kind == "system")).all()
    return {m.id: m for m in rows}


def _peers(conversation_ids: list[int], user_id: int) -> dict[int, User]:
    if not conversation_ids:
        return {}
    rows = db.session.execute(
        select(Membership.conversation_id, User)
        .join(User, User.id == Membership.user_id)
        .where(Membership.conversation_id.in_(conversation_ids), Membership.user_id != user_id)
    ).all()
    return {cid: user for cid, user in rows}


def _member_rows(user_id: int):
    """Select (conversation, membership, unread count) of the conversations this user belongs to.

    The count comes from the member's counters in the same query (0 without an Unread row).
    """
    return (
        member_pairs(user_id)
        .outerjoin(Unread, and_(Unread.conversation_id == Conversation.id, Unread.user_id == user_id))
        .add_columns(unread_count())
    )


def build_rows(user_id: int, triples: list[tuple[Conversation, Membership, int]]) -> list[ConversationRow]:
    """Turn (conversation, membership, unread) triples into list rows with names (2 queries at most)."""
    peers = _peers([c.id for c, _m, _n in triples if not c.is_group], user_id)
    systems = _system_last_messages([c.last_message_id for c, _m, _n in triples if c.is_group and c.last_message_id])
    return [make_row(conversation, peers.get(conversation.id), unread or 0,
                     systems.get(conversation.last_message_id or 0))
            for conversation, _membership, unread in triples]


def list_cursor(row: ConversationRow) -> str:
    """Return the 'before' value that continues the list after this row (its sort key)."""
    return f"{row.sort_key}-{row.id}"


def _parse_cursor(before: str) -> tuple[datetime, int]:
    match = _CURSOR.fullmatch(before or "")
    if match is None:
        raise DomainError(_l("That page of the list does not exist."), 400)
    try:
        when = _EPOCH + timedelta(microseconds=int(match[1]))
    except OverflowError:
        raise DomainError(_l("That page of the list does not exist."), 400)
    return when, parse_id(match[2], _l("That page of the list does not exist."))


def conversation_list(user_id: int) -> list[ConversationRow]:
    """Return all of the user's visible conversations, newest first."""
    return conversation_page(user_id, limit=None)[0]


def conversation_page(user_id: int, before: str | None = None,
                      limit: int | None = LIST_PAGE) -> tuple[list[ConversationRow], str | None]:
    """Return a page of the user's visible conversations, newest first, and the cursor of the next page.

    Keyset pagination on (last activity, id): a conversation that moves to the top while the
    user scrolls is not shown twice. Three queries at most whatever the page or the list's length.
    """
    sort_key = func.coalesce(Conversation.last_message_at, Conversation.created_at)
    query = (
        _member_rows(user_id)
        .where(or_(Membership.hidden_through.is_(None),
                   func.coalesce(Conversation.last_message_id, 0) > Membership.hidden_through))
        .order_by(sort_key.desc(), Conversation.id.desc())
    )
    if before is not None:
        when, cid = _parse_cursor(before)
        query = query.where(or_(sort_key < when, and_(sort_key == when, Conversation.id < cid)))
    if limit is not None:
        query = query.limit(limit + 1)
    triples = [(c, m, n) for c, m, n in db.session.execute(query).all()]
    more = limit is not None and len(triples) > limit
    rows = build_rows(user_id, triples[:limit] if more else triples)
    return rows, (list_cursor(rows[-1]) if more else None)


def rows_for_user(user_id: int, cids) -> dict[int, ConversationRow]:
    """Return one user's visible list rows for these conversations, in a fixed number of queries."""
    cids = list(cids)
    if not cids:
        return {}
    triples = db.session.execute(_member_rows(user_id).where(Conversation.id.in_(cids))).all()
    visible = [(c, m, n) for c, m, n in triples if not m.is_hidden(c)]
    return {row.id: row for row in build_rows(user_id, visible)}


def conversation_row(user_id: int, cid: int) -> ConversationRow | None:
    """Return one list row for a user, or None if they are not a member or it is hidden."""
    return rows_for_user(user_id, [cid]).get(cid)


def rows_for_members(cid: int, user_ids) -> dict[int, ConversationRow | None]:
    """Return the list row (None when hidden) of each of these users who is a member, in a fixed number of queries.

    The real-time layer calls this for conversation events (renames, members added or removed,
    reads) for all the members a process holds, so a 200-member group costs the same handful of
    queries as a 1:1. New messages carry their members' states in their event.
    """
    wanted = set(user_ids)
    conversation = db.session.get(Conversation, cid)
    if conversation is None or not wanted:
        return {}
    # All of the conversation's memberships (at most 201), filtered here: a process may hold
    # thousands of users, which would make a huge IN list.
    memberships = {m.user_id: m for m in db.session.scalars(select(Membership).where(
        Membership.conversation_id == cid)) if m.user_id in wanted}
    if not memberships:
        return {}
    counts = dict(db.session.execute(
        select(Unread.user_id, unread_count())
        .join(Conversation, Conversation.id == Unread.conversation_id)
        .where(Unread.conversation_id == cid, Unread.user_id.in_(list(memberships)))
    ).all())
    people = {}
    if not conversation.is_group:
        people = {u.id: u for u in db.session.scalars(select(User).join(
            Membership, Membership.user_id == User.id).where(Membership.conversation_id == cid))}
    system = _system_last_messages([conversation.last_message_id] if conversation.is_group
                                   and conversation.last_message_id else [])
    rows: dict[int, ConversationRow | None] = {}
    for uid, membership in memberships.items():
        if membership.is_hidden(conversation):
            rows[uid] = None
            continue
        peer = next((u for pid, u in people.items() if pid != uid), None)
        rows[uid] = make_row(conversation, peer, counts.get(uid, 0), system.get(conversation.last_message_id or 0))
    return rows
