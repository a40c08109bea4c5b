"""Accounts: registration, sign-in checks, profile changes and account deletion."""
from __future__ import annotations

import re

import redis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask_babel import lazy_gettext as _l
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from ..events import ListsStale, SessionClosed, UserClosed, emit, publish
from ..extensions import db, redis_store
from ..models import Conversation, Image, Membership, Message, User, utcnow
from . import AccountClosed, DomainError, sync_loaded, transaction
from .conversations import delete_conversation_rows, refresh_last_message
from .images import has_file, store_upload
from .people import find_user_by_username
from .read_state import forget_texts

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,32}$")
_hasher = PasswordHasher()
# Verifying against a dummy hash when the user does not exist keeps sign-in timing the same,
# so the response time does not reveal which usernames exist.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


def hash_password(password: str) -> str:
    """Return an argon2id hash of the password."""
    return _hasher.hash(password)


def verify_password(user: User | None, password: str) -> bool:
    """Check a password against a user's hash in constant-ish time."""
    try:
        return _hasher.verify(user.password_hash if user else _DUMMY_HASH, password) and user is not None
    except (VerificationError, InvalidHashError):
        return False


def check_new_username(username: str) -> str:
    """Return the username if it is well-formed and free, else raise."""
    username = username.strip()
    if not USERNAME_RE.match(username):
        raise DomainError(_l("Usernames are 3 to 32 letters, digits, '_', '.' or '-'."), 422)
    if find_user_by_username(username) is not None:
        raise DomainError(_l("That username is already taken."), 422)
    return username


def register_user(username: str, password: str, name: str = "", *, is_admin: bool = False) -> User:
    """Create an account and return it."""
    username = check_new_username(username)
    if len(password) < 8:
        raise DomainError(_l("Passwords need at least 8 characters."), 422)
    user = User(
        username=username,
        name=(name or "").strip()[:64] or username,
        password_hash=hash_password(password),
        is_admin=is_admin,
    )
    db.session.add(user)
    try:
        db.session.commit()
    except IntegrityError:
        # Two registrations of one name at once: the unique index decides.
        db.session.rollback()
        raise DomainError(_l("That username is already taken."), 422)
    return user


def authenticate(username: str, password: str) -> User | None:
    """Return the active user whose credentials these are, or None.

    Right credentials of a disabled account raise AccountClosed: only someone who knows the
    password learns that the account exists and why it cannot sign in.
    """
    user = find_user_by_username(username)
    if not verify_password(user, password) or user is None:
        return None
    if user.is_disabled:
        raise AccountClosed(_l("This account has been disabled. Ask an administrator to enable it."))
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_seen_at = utcnow()
    db.session.commit()
    _seen_window_starts(user.id)
    return user


def update_profile(user: User, *, name: str, remark: str, avatar=None, background=None) -> User:
    """Change nickname, signature and pictures in one transaction."""
    name = name.strip()
    if not 1 <= len(name) <= 64:
        raise DomainError(_l("Nicknames are 1 to 64 characters."), 422)
    remark = remark.strip()
    if len(remark) > 200:
        raise DomainError(_l("The signature may be at most 200 characters."), 422)
    with transaction():
        old_ids = []
        # Validate and encode both uploads before anything is written.
        if has_file(avatar):
            image = store_upload(avatar, uploader_id=user.id)
            old_ids.append(user.avatar_id)
            user.avatar_id = image.id
        if has_file(background):
            image = store_upload(background, uploader_id=user.id)
            old_ids.append(user.background_id)
            user.background_id = image.id
        user.name = name
        user.remark = remark
        stale = [i for i in old_ids if i]
        if stale:
            db.session.execute(delete(Image).where(Image.id.in_(stale)))
    return user


def delete_user(user: User) -> list[int]:
    """Delete a user with their 1:1 conversations and all their messages; return affected user ids.

    Groups they own pass to the longest-standing other member, or are deleted when empty.
    Does not commit: callers wrap it in their transaction. Its sockets close and the lists of
    those who knew them reload once that transaction commits.
    """
    affected: set[int] = set()
    direct_ids = db.session.scalars(
        select(Conversation.id)
        .join(Membership, Membership.conversation_id == Conversation.id)
        .where(Membership.user_id == user.id, Conversation.is_group.is_(False))
    ).all()
    if direct_ids:
        affected.update(
            db.session.scalars(select(Membership.user_id).where(Membership.conversation_id.in_(direct_ids))).all()
        )
        delete_conversation_rows(direct_ids)
    group_ids = db.session.scalars(
        select(Membership.conversation_id).where(Membership.user_id == user.id)
    ).all()
    # Every group's other members in one query, longest-standing first.
    others_by_group: dict[int, list[Membership]] = {cid: [] for cid in group_ids}
    owned: dict[int, Conversation] = {}
    if group_ids:
        for membership in db.session.scalars(
            select(Membership)
            .where(Membership.conversation_id.in_(group_ids), Membership.user_id != user.id)
            .order_by(Membership.joined_at, Membership.user_id)
        ):
            others_by_group[membership.conversation_id].append(membership)
        owned = {c.id: c for c in db.session.scalars(select(Conversation).where(
            Conversation.id.in_(group_ids), Conversation.owner_id == user.id))}
    empty = [cid for cid, others in others_by_group.items() if not others]
    if empty:
        delete_conversation_rows(empty)
    for cid, others in others_by_group.items():
        affected.update(m.user_id for m in others)
        if others and cid in owned:
            owned[cid].owner_id = others[0].user_id
            others[0].role = "owner"
    # Their messages in groups, with the images attached to them.
    image_ids = db.session.scalars(
        select(Message.image_id).where(Message.sender_id == user.id, Message.image_id.is_not(None))
    ).all()
    touched = db.session.scalars(
        select(Message.conversation_id).where(Message.sender_id == user.id).distinct()
    ).all()
    forget_texts(Message.sender_id == user.id)
    db.session.execute(delete(Message).where(Message.sender_id == user.id))
    if image_ids:
        db.session.execute(delete(Image).where(Image.id.in_(image_ids)))
    db.session.execute(delete(Membership).where(Membership.user_id == user.id))
    db.session.execute(delete(Image).where(Image.uploader_id == user.id))
    db.session.execute(update(Conversation).where(Conversation.owner_id == user.id).values(owner_id=None))
    db.session.delete(user)
    db.session.flush()
    if touched:
        refresh_last_message(db.session.scalars(select(Conversation.id).where(Conversation.id.in_(touched))).all())
    affected.discard(user.id)
    emit(UserClosed(user.id))
    emit(ListsStale(sorted(affected)))
    return sorted(affected)


def delete_account(user: User, password: str) -> None:
    """Delete the signed-in user's account after checking their password."""
    if not verify_password(user, password):
        raise DomainError(_l("That password is not right."), 403)
    with transaction():
        delete_user(user)


REVOKED_TTL = 31 * 86400


def revoke_session(sid: str) -> None:
    """Sign a session out everywhere: close its sockets, and refuse its cookie for a month."""
    try:
        redis_store.client.setex(f"webchat:revoked:{sid}", REVOKED_TTL, 1)
    except (redis.RedisError, OSError):
        pass  # the socket close event and the cleared cookie still sign the browser out
    publish(SessionClosed(sid))  # nothing written to the database: no commit to wait for


SEEN_EVERY = 300  # seconds: "last seen" is written at most once per user per 5 minutes


def check_session(sid: str | None, user_id: int) -> tuple[bool, bool]:
    """For a signed-in request, one Redis round trip: was this session signed out, and is the
    user's "last seen" due to be written? Without Redis: neither (the cookie still works)."""
    try:
        pipe = redis_store.client.pipeline(transaction=False)
        if sid:
            pipe.exists(f"webchat:revoked:{sid}")
        pipe.set(f"webchat:seen:{user_id}", 1, nx=True, ex=SEEN_EVERY)
        replies = pipe.execute()
    except (redis.RedisError, OSError):
        return False, False
    return (bool(replies[0]) if sid else False), bool(replies[-1])


def _seen_window_starts(user_id: int) -> None:
    """Note in Redis that "last seen" was just written (signing in writes it)."""
    try:
        redis_store.client.set(f"webchat:seen:{user_id}", 1, ex=SEEN_EVERY)
    except (redis.RedisError, OSError):
        pass


def mark_seen(user_id: int) -> None:
    """Write an active user's "last seen" time (one UPDATE, committed)."""
    now = utcnow()
    db.session.execute(update(User).where(User.id == user_id, User.is_disabled.is_(False)).values(last_seen_at=now)
                       .execution_options(synchronize_session=False))
    sync_loaded(User, user_id, {"last_seen_at": now})
    db.session.commit()
