"""Conversations: 1:1 found-or-created, groups and their members, hiding, deleting, opening one."""
from __future__ import annotations

from dataclasses import dataclass

from flask_babel import lazy_gettext as _l
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload

from ..events import ConversationChanged, ConversationRemoved, Typing, emit, publish
from ..extensions import db, redis_store
from ..models import Conversation, Image, Membership, Message, Unread, User
from ..presence import online_user_ids
from . import DomainError, Forbidden, NotFound, parse_id, sync_loaded, transaction
from .history import PAGE_SIZE, messages_page, newest_message_id
from .images import has_file, store_upload
from .membership import add_member, get_conversation_for, lock_conversations, members_of
from .message_text import preview_of
from .people import NameLabel, active_users, find_user_by_username, ids_for_usernames, name_labels, too_many_people
from .read_state import mark_read, recount_read
from .text_rules import check_display_name, name_key

MAX_GROUP_OTHERS = 200
MIN_GROUP_OTHERS = 2

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
    add_member(conversation, low)
    add_member(conversation, high)
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
        emit(ConversationChanged(conversation.id, user_ids=[me.id]))
        db.session.commit()
        sync_loaded(Membership, (conversation.id, me.id), {"hidden_through": None})
    return conversation


def _parse_ids(ids) -> list[int]:
    out = []
    for raw in ids or []:
        try:
            out.append(parse_id(raw))
        except NotFound:
            raise DomainError(_l("Some of those people do not exist."), 422)
    return list(dict.fromkeys(out))


def _existing_users(ids: list[int]) -> list[User]:
    users = active_users(ids)
    if len(users) != len(ids):
        raise DomainError(_l("Some of those people do not exist."), 422)
    order = {uid: i for i, uid in enumerate(ids)}
    return sorted(users, key=lambda u: order[u.id])


def _check_group_name(name: str) -> str:
    return check_display_name(name, _l("Group names are 1 to 64 characters."))


def system_message(conversation: Conversation, actor: User | None, event: str, body: str = "") -> Message:
    """Add a system line (created, added, removed, left, renamed) and make it the last message.

    The conversation is locked first, so no send can commit a newer message between this line's
    id and its becoming the last message: the last message never moves back.
    """
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
        add_member(conversation, owner.id, role="owner")
        for user in members:
            add_member(conversation, user.id)
        line = system_message(conversation, owner, "created", name)
        emit(ConversationChanged(conversation.id, line_id=line.id))
    return conversation


def _require_group_owner(actor: User, conversation: Conversation) -> None:
    if not conversation.is_group:
        raise DomainError(_l("Only groups have members to manage."), 422)
    if conversation.owner_id != actor.id:
        raise Forbidden(_l("Only the group's owner can do that."))


def add_members(actor: User, conversation: Conversation, member_ids, usernames: str = "") -> list[User]:
    """Add people to a group (owner only), named by id and/or by username (comma or space separated)."""
    # The owner first: anyone else learns nothing about who exists, and costs no lookup.
    _require_group_owner(actor, conversation)
    member_ids = list(member_ids or [])
    if len(member_ids) > MAX_GROUP_OTHERS:  # before parsing: bound the work, and the query's parameters
        raise too_many_people(MAX_GROUP_OTHERS)
    ids = list(dict.fromkeys(_parse_ids(member_ids) + ids_for_usernames(usernames, MAX_GROUP_OTHERS)))
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
            add_member(conversation, user.id)
        if conversation.last_message_id:
            db.session.flush()
            recount_read(conversation.id, Unread.user_id.in_([u.id for u in users]))
        line = system_message(conversation, actor, "added", ", ".join(u.name for u in users))
        emit(ConversationChanged(conversation.id, line_id=line.id))
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
        emit(ConversationChanged(conversation.id, removed_user_ids=[user_id], line_id=line.id))


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
        emit(ConversationChanged(conversation.id, removed_user_ids=[user.id], line_id=line.id))


def update_group(actor: User, conversation: Conversation, name: str | None = None, image=None) -> None:
    """Rename a group and/or change its picture (owner only)."""
    _require_group_owner(actor, conversation)
    line = None
    with transaction():
        name = _check_group_name(name) if name is not None else None
        if name is not None and name != (conversation.name or ""):
            conversation.name = name
            line = system_message(conversation, actor, "renamed", conversation.name)
        if has_file(image):
            old = conversation.image_id
            conversation.image_id = store_upload(image, conversation_id=conversation.id).id
            if old:
                db.session.execute(delete(Image).where(Image.id == old))
        emit(ConversationChanged(conversation.id, line_id=line.id if line else None))


def hide(user: User, conversation: Conversation, membership: Membership) -> None:
    """Hide the conversation from this user's list until a newer message arrives."""
    membership.hidden_through = conversation.last_message_id or 0
    emit(ConversationChanged(conversation.id, user_ids=[user.id]))
    db.session.commit()


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
        emit(ConversationRemoved(cid, list(member_ids)))
    return list(member_ids)


def refresh_last_message(conversation_ids) -> None:
    """Point each conversation's last message at its newest remaining message, or at nothing.

    Two reads for all of them (the newest ids, then those messages with their senders), then
    one UPDATE statement by primary key with each conversation's own values (an executemany).
    """
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




def announce_typing(user: User, conversation: Conversation) -> None:
    """Tell the conversation's other viewers that this member is typing (nothing is stored)."""
    publish(Typing(conversation.id, user.id, user.name))  # no write to wait for: a commit would never come


@dataclass
class ChatHeader:
    """What a chat's header shows: the members (owner first), who of them is online, a 1:1's peer.

    `identities` (member id -> [username, name key]) lets the page tell apart, in messages that
    arrive live, members whose nicknames look the same (static/js/app.js, markSharedNames).
    """

    conversation: Conversation
    members: list[tuple[Membership, User]]
    online: set[int]
    peer: User | None
    is_owner: bool
    identities: dict[int, list[str]]


@dataclass
class ChatView:
    """An opened chat: its header, the member's place, the newest page of messages.

    `labels` gives the members' and senders' @usernames, and which of their nicknames look alike.
    """

    header: ChatHeader
    membership: Membership
    messages: list[Message]
    has_older: bool
    newest_id: int
    labels: dict[int, NameLabel]


def chat_header(user_id: int, conversation: Conversation) -> ChatHeader:
    """Return what the chat's header shows to this member."""
    members = members_of(conversation.id)
    online = online_user_ids(redis_store.client, [u.id for _m, u in members if u.id != user_id])
    peer = None if conversation.is_group else next((u for _m, u in members if u.id != user_id), None)
    identities = {u.id: [u.username, name_key(u.name)] for _m, u in members}
    return ChatHeader(conversation, members, online, peer, conversation.owner_id == user_id, identities)


def open_conversation(user_id: int, cid, before=None) -> ChatView:
    """Open a chat for a member: mark it read and return its header and a page of messages."""
    conversation, membership = get_conversation_for(user_id, cid, with_unread=True)
    # The page's socket asks for what came after this id. Read before the messages: one that
    # commits in between is then newer, or within replay's lookback, never skipped.
    newest_id = newest_message_id(user_id)
    mark_read(user_id, conversation, unread=membership.unread)
    messages = messages_page(conversation.id, before=before)
    header = chat_header(user_id, conversation)
    # Former members' messages stay: their names count too.
    labels = name_labels([u for _m, u in header.members] + [m.sender for m in messages if m.sender])
    return ChatView(header, membership, messages, len(messages) == PAGE_SIZE, newest_id, labels)
