"""Conversations: 1:1 and groups, membership, hiding, disbanding and the conversation list."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from flask_babel import lazy_gettext as _l
from sqlalchemy import and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload

from ..extensions import db
from ..models import Conversation, Image, Membership, Message, Unread, User, utcnow
from . import AccountClosed, DomainError, Forbidden, NotFound, as_active_member, parse_id, sync_loaded, transaction
from .images import has_file, store_upload

MAX_GROUP_OTHERS = 200
MIN_GROUP_OTHERS = 2


def _member_pairs(user_id: int):
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
    query = _member_pairs(user_id).where(Conversation.id == cid)
    if with_user:
        query = query.options(joinedload(Membership.user, innerjoin=True))
    if with_unread:
        query = query.options(joinedload(Membership.unread))
    row = db.session.execute(query).first()
    if row is None:
        # Same answer whether it does not exist or the user is not in it.
        raise NotFound(_l("No such conversation."))
    return row[0], row[1]


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


def _add_member(conversation: Conversation, user_id: int, role: str = "member") -> Membership:
    membership = Membership(conversation=conversation, user_id=user_id, role=role)
    # New members start with everything so far read: no badge for history. Their read_count is
    # 0 here (plain values, so several members go in one executemany); a conversation that has
    # messages recounts them after the insert (add_members: one statement for all of them).
    membership.unread = Unread(user_id=user_id, last_read_message_id=conversation.last_message_id or 0, read_count=0)
    db.session.add(membership)
    return membership


def find_or_create_direct(a: User, b: User) -> Conversation:
    """Return the 1:1 conversation of two users, creating it once even under concurrent calls."""
    if a.id == b.id:
        raise DomainError(_l("You cannot start a conversation with yourself."), 422)
    if b.is_disabled:
        raise NotFound(_l("No such user."))
    low, high = sorted((a.id, b.id))
    key = f"{low}:{high}"
    existing = db.session.scalar(select(Conversation).where(Conversation.direct_key == key))
    if existing is not None:
        return existing
    conversation = Conversation(is_group=False, direct_key=key)
    db.session.add(conversation)
    _add_member(conversation, low)
    _add_member(conversation, high)
    try:
        db.session.commit()
    except IntegrityError:
        # The other request won the race on the unique direct_key: use its conversation.
        db.session.rollback()
        existing = db.session.scalar(select(Conversation).where(Conversation.direct_key == key))
        if existing is None:
            raise
        return existing
    return conversation


def start_direct(me: User, user_id=None, username: str | None = None) -> Conversation:
    """Open the 1:1 conversation with the user named by id or username, creating it once.

    Starting a conversation one has hidden brings it back to one's list, as a new message would.
    """
    from .accounts import find_user_by_username

    other = None
    if str(user_id or "").strip():
        other = db.session.get(User, parse_id(user_id, _l("No such user.")))
    elif username:
        other = find_user_by_username(username)
    if other is None:
        raise NotFound(_l("No such user."))
    conversation = find_or_create_direct(me, other)
    unhidden = db.session.execute(
        update(Membership).where(Membership.conversation_id == conversation.id, Membership.user_id == me.id,
                                 Membership.hidden_through.is_not(None))
        .values(hidden_through=None)).rowcount
    if unhidden:
        db.session.commit()
        sync_loaded(Membership, (conversation.id, me.id), {"hidden_through": None})
        from ..realtime import bus

        bus.conversation_changed(conversation.id, user_ids=[me.id])
    return conversation


def _parse_ids(ids) -> list[int]:
    out = []
    for raw in ids or []:
        try:
            out.append(parse_id(raw))
        except NotFound:
            raise DomainError(_l("Some of those people do not exist."), 422)
    return list(dict.fromkeys(out))


def _active_users(ids, *order_by) -> list[User]:
    """The active (not disabled) users among these ids, in one query."""
    return list(db.session.scalars(
        select(User).where(User.id.in_(ids), User.is_disabled.is_(False)).order_by(*order_by)).all())


def _existing_users(ids: list[int]) -> list[User]:
    users = _active_users(ids)
    if len(users) != len(ids):
        raise DomainError(_l("Some of those people do not exist."), 422)
    order = {uid: i for i, uid in enumerate(ids)}
    return sorted(users, key=lambda u: order[u.id])


def _check_group_name(name: str) -> str:
    name = (name or "").strip()
    if not 1 <= len(name) <= 64:
        raise DomainError(_l("Group names are 1 to 64 characters."), 422)
    return name


def system_message(conversation: Conversation, actor: User | None, event: str, body: str = "") -> Message:
    """Add a system line (created, added, removed, left, renamed) and make it the last message.

    The conversation is locked first, so no send can commit a newer message between this line's
    id and its becoming the last message: the last message never moves back.
    """
    from .messages import preview_of

    lock_conversations([conversation.id])
    message = Message(conversation_id=conversation.id, sender_id=actor.id if actor else None, kind="system",
                      event=event, body=body[:4000])
    db.session.add(message)
    db.session.flush()
    message.sender = actor
    conversation.last_message_id = message.id
    conversation.last_message_text = preview_of(message)
    conversation.last_message_image = False
    conversation.last_message_at = message.created_at
    return message


def create_group(owner: User, name: str, member_ids, image=None) -> Conversation:
    """Create a group of the owner and 2 to 200 other members."""
    name = _check_group_name(name)
    ids = [i for i in _parse_ids(member_ids) if i != owner.id]
    if len(ids) < MIN_GROUP_OTHERS:
        raise DomainError(_l("Pick at least %(n)d other people for a group.", n=MIN_GROUP_OTHERS), 422)
    if len(ids) > MAX_GROUP_OTHERS:
        raise DomainError(_l("A group can have at most %(n)d other members.", n=MAX_GROUP_OTHERS), 422)
    members = _existing_users(ids)
    with transaction():
        conversation = Conversation(is_group=True, name=name, owner_id=owner.id)
        db.session.add(conversation)
        db.session.flush()
        if has_file(image):
            conversation.image_id = store_upload(image, conversation_id=conversation.id).id
        _add_member(conversation, owner.id, role="owner")
        for user in members:
            _add_member(conversation, user.id)
        line = system_message(conversation, owner, "created", name)
    from ..realtime import bus

    bus.conversation_changed(conversation.id, line=line.id)
    return conversation


def _require_group_owner(actor: User, conversation: Conversation) -> None:
    if not conversation.is_group:
        raise DomainError(_l("Only groups have members to manage."), 422)
    if conversation.owner_id != actor.id:
        raise Forbidden(_l("Only the group's owner can do that."))


def add_members(actor: User, conversation: Conversation, member_ids) -> list[User]:
    """Add people to a group (owner only)."""
    _require_group_owner(actor, conversation)
    ids = _parse_ids(member_ids)
    if not ids:
        raise DomainError(_l("Pick someone to add."), 422)
    current = set(db.session.scalars(
        select(Membership.user_id).where(Membership.conversation_id == conversation.id)).all())
    new_ids = [i for i in ids if i not in current]
    if not new_ids:
        raise DomainError(_l("They are already members."), 422)
    if len(current) - 1 + len(new_ids) > MAX_GROUP_OTHERS:
        raise DomainError(_l("A group can have at most %(n)d other members.", n=MAX_GROUP_OTHERS), 422)
    users = _existing_users(new_ids)
    with transaction():
        lock_conversations([conversation.id])
        db.session.refresh(conversation, ["last_message_id"])  # as of the lock
        for user in users:
            _add_member(conversation, user.id)
        if conversation.last_message_id:
            db.session.flush()
            _recount_read(conversation.id, Unread.user_id.in_([u.id for u in users]))
        line = system_message(conversation, actor, "added", ", ".join(u.name for u in users))
    from ..realtime import bus

    bus.conversation_changed(conversation.id, line=line.id)
    return users


def remove_member(actor: User, conversation: Conversation, user_id) -> None:
    """Remove one member from a group (owner only; the owner leaves instead)."""
    _require_group_owner(actor, conversation)
    user_id = parse_id(user_id, _l("No such member."))
    if user_id == actor.id:
        raise DomainError(_l("Owners leave a group instead of removing themselves."), 422)
    membership = db.session.get(Membership, (conversation.id, user_id))
    if membership is None:
        raise NotFound(_l("No such member."))
    removed = membership.user
    with transaction():
        lock_conversations([conversation.id])  # before the member's rows, as a send takes them
        db.session.delete(membership)
        line = system_message(conversation, actor, "removed", removed.name)
    from ..realtime import bus

    bus.conversation_changed(conversation.id, removed_user_ids=[user_id], line=line.id)


def leave(user: User, conversation: Conversation) -> None:
    """Leave a group; an owner hands the group to the longest-standing member, the last one deletes it."""
    if not conversation.is_group:
        raise DomainError(_l("You can hide a 1:1 conversation, not leave it."), 422)
    others = db.session.scalars(
        select(Membership)
        .where(Membership.conversation_id == conversation.id, Membership.user_id != user.id)
        .order_by(Membership.joined_at, Membership.user_id)
    ).all()
    if not others:
        disband(user, conversation, check_owner=False)
        return
    with transaction():
        lock_conversations([conversation.id])  # before the member's rows, as a send takes them
        if conversation.owner_id == user.id:
            conversation.owner_id = others[0].user_id
            others[0].role = "owner"
        db.session.execute(delete(Membership).where(
            Membership.conversation_id == conversation.id, Membership.user_id == user.id))
        line = system_message(conversation, user, "left", user.name)
    from ..realtime import bus

    bus.conversation_changed(conversation.id, removed_user_ids=[user.id], line=line.id)


def update_group(actor: User, conversation: Conversation, name: str | None = None, image=None) -> None:
    """Rename a group and/or change its picture (owner only)."""
    _require_group_owner(actor, conversation)
    line = None
    with transaction():
        if name is not None and name.strip() != (conversation.name or ""):
            conversation.name = _check_group_name(name)
            line = system_message(conversation, actor, "renamed", conversation.name)
        if has_file(image):
            old = conversation.image_id
            conversation.image_id = store_upload(image, conversation_id=conversation.id).id
            if old:
                db.session.execute(delete(Image).where(Image.id == old))
    from ..realtime import bus

    bus.conversation_changed(conversation.id, line=line.id if line else None)


def hide(user: User, conversation: Conversation, membership: Membership) -> None:
    """Hide the conversation from this user's list until a newer message arrives."""
    membership.hidden_through = conversation.last_message_id or 0
    db.session.commit()
    from ..realtime import bus

    bus.conversation_changed(conversation.id, user_ids=[user.id])


def delete_conversation_rows(conversation_ids: list[int]) -> None:
    """Delete conversations with their messages, read state, memberships and images (no commit)."""
    if not conversation_ids:
        return
    ids = list(conversation_ids)
    # Their rows first, as a send takes them before its sender's read state: otherwise a send in
    # flight and this delete would each hold a row the other waits for.
    lock_conversations(ids)
    # Explicit deletes rather than ON DELETE CASCADE alone: the order keeps every foreign key
    # satisfied at each step on every backend.
    db.session.execute(delete(Message).where(Message.conversation_id.in_(ids)))
    db.session.execute(delete(Unread).where(Unread.conversation_id.in_(ids)))
    db.session.execute(delete(Membership).where(Membership.conversation_id.in_(ids)))
    db.session.execute(delete(Image).where(Image.conversation_id.in_(ids)))
    db.session.execute(delete(Conversation).where(Conversation.id.in_(ids)))


def disband(actor: User, conversation: Conversation, *, check_owner: bool = True) -> list[int]:
    """Delete a group and everything in it (owner only); return the former members' ids."""
    if check_owner:
        _require_group_owner(actor, conversation)
    return delete_conversation(conversation.id)


def delete_conversation(cid: int) -> list[int]:
    """Delete any conversation in one transaction and tell its members; return their ids."""
    member_ids = db.session.scalars(select(Membership.user_id).where(Membership.conversation_id == cid)).all()
    with transaction():
        delete_conversation_rows([cid])
    from ..realtime import bus

    bus.conversation_removed(cid, list(member_ids))
    return list(member_ids)


def refresh_last_message(conversation_ids) -> None:
    """Point each conversation's last message at its newest remaining message, or at nothing.

    Two reads for all of them (the newest ids, then those messages with their senders), then
    one UPDATE statement by primary key with each conversation's own values (an executemany).
    """
    from .messages import preview_of

    cids = list(conversation_ids)
    if not cids:
        return
    newest_ids = db.session.execute(
        select(func.max(Message.id)).where(Message.conversation_id.in_(cids)).group_by(Message.conversation_id)
    ).scalars().all()
    newest = {m.conversation_id: m for m in db.session.scalars(
        select(Message).options(joinedload(Message.sender)).where(Message.id.in_(newest_ids)))} if newest_ids else {}
    rows = []
    for cid in cids:
        message = newest.get(cid)
        values = dict(last_message_id=None, last_message_text="", last_message_image=False, last_message_at=None)
        if message is not None:
            values = dict(last_message_id=message.id, last_message_text=preview_of(message),
                          last_message_image=message.image_id is not None and not message.body,
                          last_message_at=message.created_at)
        rows.append({"id": cid, **values})
    db.session.execute(update(Conversation), rows)
    for row in rows:
        sync_loaded(Conversation, row["id"], {k: v for k, v in row.items() if k != "id"})


@dataclass
class ConversationRow:
    """One row of a user's conversation list."""

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
            from .messages import system_text

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


def _unread_count():
    """A member's exact unread count (an Unread row joined to its Conversation).

    The conversation's text messages less those the member has read, both kept as counters
    (see models.Unread): reading it costs the same however many messages are unread.
    """
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


def _recount_read(conversation_id: int, which) -> None:
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
    _recount_read(conversation_id, Unread.last_read_message_id >= message_id)


def forget_texts(condition) -> None:
    """Take the messages matching `condition` out of the unread counters; call before deleting them.

    Each conversation loses them from its text_count, each member from their read_count those
    they had read (at or before their pointer, or their own): unread counts stay exact after
    retention and account deletion. No commit. The conversations are locked first (see
    lock_conversations), then two statements, whatever the number of messages or members.
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
        select(Unread.conversation_id, _unread_count())
        .join(Conversation, Conversation.id == Unread.conversation_id)
        .where(Unread.user_id == user_id, Conversation.text_count > Unread.read_count)
    )
    if conversation_ids is not None:
        query = query.where(Unread.conversation_id.in_(list(conversation_ids)))
    return {cid: count for cid, count in db.session.execute(query)}


def _system_last_messages(message_ids: list[int]) -> dict[int, Message]:
    """Return the system lines among these messages (with their actors), by id, in one query."""
    if not message_ids:
        return {}
    from sqlalchemy.orm import joinedload

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
        _member_pairs(user_id)
        .outerjoin(Unread, and_(Unread.conversation_id == Conversation.id, Unread.user_id == user_id))
        .add_columns(_unread_count())
    )


def build_rows(user_id: int, triples: list[tuple[Conversation, Membership, int]]) -> list[ConversationRow]:
    """Turn (conversation, membership, unread) triples into list rows with names (2 queries at most)."""
    direct_ids = [c.id for c, _m, _n in triples if not c.is_group]
    peers = _peers(direct_ids, user_id)
    systems = _system_last_messages([c.last_message_id for c, _m, _n in triples if c.is_group and c.last_message_id])
    rows = []
    for conversation, _membership, unread in triples:
        peer = peers.get(conversation.id)
        if conversation.is_group:
            title, image_id = conversation.name or "", conversation.image_id
        else:
            title = peer.name if peer else str(_l("Deleted user"))
            image_id = peer.avatar_id if peer else None
        rows.append(ConversationRow(conversation, title, image_id, peer, unread or 0,
                                    systems.get(conversation.last_message_id or 0)))
    return rows


LIST_PAGE = 50  # rows per page of the conversation list
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CURSOR = re.compile(r"(\d{1,18})-(\d{1,19})")


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

    The hub calls this for conversation events (renames, members added or removed, reads) for
    all the members a process holds, so a 200-member group costs the same handful of queries as
    a 1:1. New messages carry their members' states in their event (member_states).
    """
    wanted = set(user_ids)
    conversation = db.session.get(Conversation, cid)
    if conversation is None or not wanted:
        return {}
    # All of the conversation's memberships (at most 201), filtered here: a process may hold
    # thousands of users, which would make a huge IN list.
    memberships = {m.user_id: m for m in db.session.scalars(select(Membership).where(
        Membership.conversation_id == cid)) if m.user_id in wanted}
    user_ids = list(memberships)
    if not user_ids:
        return {}
    counts = dict(db.session.execute(
        select(Unread.user_id, _unread_count())
        .join(Conversation, Conversation.id == Unread.conversation_id)
        .where(Unread.conversation_id == cid, Unread.user_id.in_(user_ids))
    ).all())
    people = {}
    if not conversation.is_group:
        people = {u.id: u for u in db.session.scalars(select(User).join(
            Membership, Membership.user_id == User.id).where(Membership.conversation_id == cid))}
    system = _system_last_messages([conversation.last_message_id] if conversation.is_group
                                   and conversation.last_message_id else [])
    rows: dict[int, ConversationRow | None] = {}
    for uid in user_ids:
        membership = memberships.get(uid)
        if membership is None:
            continue
        if membership.is_hidden(conversation):
            rows[uid] = None
            continue
        if conversation.is_group:
            title, image_id, peer = conversation.name or "", conversation.image_id, None
        else:
            peer = next((u for pid, u in people.items() if pid != uid), None)
            title = peer.name if peer else str(_l("Deleted user"))
            image_id = peer.avatar_id if peer else None
        rows[uid] = ConversationRow(conversation, title, image_id, peer, counts.get(uid, 0),
                                    system.get(conversation.last_message_id or 0))
    return rows


class MemberState(NamedTuple):
    hidden_through: int | None
    unread: int
    name: str
    avatar_id: str | None


def _member_states_statement():
    return (
        select(Membership.user_id, Membership.hidden_through, _unread_count(), User.name, User.avatar_id)
        .join(Unread, and_(Unread.conversation_id == Membership.conversation_id,
                           Unread.user_id == Membership.user_id))
        .join(Conversation, Conversation.id == Membership.conversation_id)
        .join(User, User.id == Membership.user_id)
        .where(Membership.conversation_id == bindparam("cid"))
    )


# Built once: every send runs it, and building a statement costs more than running it.
_MEMBER_STATES = _member_states_statement()


def member_states(cid: int) -> dict[int, MemberState]:
    """Return every member's hidden state, exact unread count, name and avatar, in one query.

    A send runs it after its writes, in the same transaction, and the message's event carries
    the result: the processes that push the message then need no query at all. Run after the
    conversation row is locked by the send's update, it counts every message committed before
    this one's (senders to one conversation commit one at a time).
    """
    # On the session's connection (its transaction), without the ORM's statement handling.
    rows = db.session.connection().execute(_MEMBER_STATES, {"cid": cid}).all()
    return {uid: MemberState(*state) for uid, *state in rows}


def members_of(conversation_id: int) -> list[tuple[Membership, User]]:
    """Return a conversation's members with their users, owner first."""
    rows = db.session.execute(
        select(Membership, User).join(User, User.id == Membership.user_id)
        .where(Membership.conversation_id == conversation_id)
        .order_by((Membership.role == "owner").desc(), Membership.joined_at, User.id)
    ).all()
    return [(m, u) for m, u in rows]


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
    for uid, read_count in moved.items():
        sync_loaded(Unread, (cid, uid), {**values, "read_count": read_count})
    if notify and moved:
        from ..realtime import bus

        for uid in sorted(moved):
            bus.conversation_read(cid, uid)
    return set(moved)


def announce_typing(user: User, conversation: Conversation) -> None:
    """Tell the conversation's other viewers that this member is typing (nothing is stored)."""
    from ..realtime import bus

    bus.typing(conversation.id, user.id, user.name)


def ids_for_usernames(text: str) -> list[int]:
    """Resolve comma- or space-separated usernames to user ids; unknown names are refused."""
    names = [n for n in (text or "").replace(",", " ").split() if n]
    if not names:
        return []
    users = db.session.scalars(select(User).where(func.lower(User.username).in_([n.lower() for n in names]))).all()
    found = {u.username.lower(): u.id for u in users}
    missing = [n for n in names if n.lower() not in found]
    if missing:
        raise DomainError(_l("No user called %(name)s.", name=missing[0]), 422)
    return [found[n.lower()] for n in names]


def group_form_people(user_id: int, q: str = "", picked=()) -> tuple[list[User], set[int]]:
    """The people the new-group form offers, and which of them are ticked.

    One's 1:1 contacts, then the search's results, then people picked before (a refused form
    shown again: they may have come from an earlier search), each once and never oneself.
    """
    contacts = [r.peer for r in conversation_list(user_id) if r.peer is not None]
    results = search_users(q, user_id) if q else []
    picked_users = [u for u in users_by_ids(picked) if u.id != user_id]
    people: dict[int, User] = {}
    for user in contacts + results + picked_users:
        people.setdefault(user.id, user)
    return list(people.values()), {u.id for u in picked_users}


def users_by_ids(raw_ids, limit: int = MAX_GROUP_OTHERS) -> list[User]:
    """Return the active users among these ids as given (garbage, unknown and disabled ones left out), by name."""
    wanted = set()
    for raw in list(raw_ids)[:limit]:
        try:
            wanted.add(parse_id(raw))
        except NotFound:
            continue
    return _active_users(wanted, func.lower(User.name), User.id) if wanted else []


def search_users(query: str, exclude_id: int, limit: int = 20) -> list[User]:
    """Find active users by username or nickname."""
    query = (query or "").strip()
    if not query:
        return []
    pattern = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return db.session.scalars(
        select(User)
        .where(User.id != exclude_id, User.is_disabled.is_(False))
        .where(or_(func.lower(User.username).like(pattern, escape="\\"),
                   func.lower(User.name).like(pattern, escape="\\")))
        .order_by(func.lower(User.username))
        .limit(limit)
    ).all()
