"""History: pages of a conversation's messages, and what a reconnecting socket missed."""
from __future__ import annotations

from datetime import timedelta

from flask_babel import lazy_gettext as _l
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import joinedload

from ..extensions import db
from ..models import Conversation, Membership, Message
from . import MAX_ID, DomainError, NotFound

PAGE_SIZE = 50
# A message can commit after one with a larger id (ids are taken at insert, not at commit);
# replay looks back this far before the client's newest id so a late committer is not lost.
REPLAY_LOOKBACK = timedelta(seconds=30)


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
