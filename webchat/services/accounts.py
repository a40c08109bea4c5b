"""Accounts: registration and password rules, sign-in with its per-account limit, signed-in
sessions, profile changes and account deletion."""
from __future__ import annotations

import hashlib
import logging
import re
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import redis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import current_app
from flask_babel import lazy_gettext as _l
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from zxcvbn.frequency_lists import FREQUENCY_LISTS

from ..events import ListsStale, SessionClosed, UserClosed, emit
from ..extensions import db, redis_store
from ..models import Conversation, Image, Membership, Message, User, UserSession, utcnow
from . import MAX_ROW_ID, AccountClosed, DomainError, NotFound, sync_loaded, transaction
from .conversations import delete_conversation_rows, refresh_last_message
from .images import has_file, store_upload
from .people import find_user_by_username
from .read_state import forget_texts
from .text_rules import check_display_name

log = logging.getLogger(__name__)

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,32}$")
PASSWORD_MIN, PASSWORD_MAX = 8, 128  # the cap bounds the work of hashing what a stranger sends
# zxcvbn's list of the 30,000 most used passwords (lowercase; MIT licence, from the zxcvbn package).
COMMON_PASSWORDS = frozenset(FREQUENCY_LISTS["passwords"])
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


def _check_password_length(password: str) -> None:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise DomainError(_l("Passwords need 8 to 128 characters."), 422)


def check_new_password(password: str, username: str) -> str:
    """Return a password a person chose if it may be used for this username, else raise."""
    _check_password_length(password)
    folded = password.lower()
    if username.strip().lower() in folded:
        raise DomainError(_l("The password must not contain the username."), 422)
    if folded in COMMON_PASSWORDS:
        raise DomainError(_l("That password is one of the most common ones: choose another."), 422)
    return password


def register_user(username: str, password: str, name: str = "", *, is_admin: bool = False) -> User:
    """Create an account and return it (a person signing up goes through sign_up and its rules)."""
    username = check_new_username(username)
    _check_password_length(password)
    user = User(
        username=username,
        name=check_display_name(name) if (name or "").strip() else username,
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


def sign_up(username: str, password: str, name: str = "", *, is_admin: bool = False) -> User:
    """Create an account with a password a person chose: it must pass the password rules."""
    check_new_password(password, username)
    return register_user(username, password, name, is_admin=is_admin)


# -- the per-account sign-in limit ------------------------------------------------------------

class TooManyAttempts(DomainError):
    """Too many wrong passwords for one account: wait `retry_after` seconds."""

    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(_l("Too many failed sign-ins for this account. Try again in %(seconds)s seconds.",
                            seconds=retry_after))
        self.retry_after = retry_after


# One atomic step per attempt, on Redis's clock: count it, and once the free attempts are used
# up refuse every attempt until a delay that doubles with each one has passed. Counting before
# the password is checked means parallel guesses cannot all slip in before the first failure.
# KEYS[1]: the account's attempts; ARGV: free attempts, first delay, longest delay, memory (s).
# Returns 0 (go ahead) or the seconds left to wait.
_ATTEMPT = """
local now = tonumber(redis.call('TIME')[1])
local free = tonumber(ARGV[1])
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local next_at = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
if n >= free and now < next_at then return next_at - now end
n = n + 1
redis.call('HSET', KEYS[1], 'n', n)
local keep = tonumber(ARGV[4])
if n >= free then
  local delay = math.min(tonumber(ARGV[2]) * 2 ^ (n - free), tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], 'next', math.floor(now + delay))
  keep = math.max(keep, math.ceil(delay))
end
redis.call('EXPIRE', KEYS[1], keep)
return 0
"""


def _attempts_key(username: str) -> str:
    return "webchat:signin:" + username.strip().lower()


def claim_attempt(username: str) -> None:
    """Count a password attempt for this account, or raise TooManyAttempts while it must wait.

    Without Redis nobody can be counted, so nobody may guess: 503, logged, rather than no limit.
    """
    config = current_app.config
    try:
        wait = redis_store.client.eval(
            _ATTEMPT, 1, _attempts_key(username), config.get("LOGIN_FREE_ATTEMPTS", 5),
            config.get("LOGIN_DELAY_BASE", 15), config.get("LOGIN_DELAY_MAX", 900),
            config.get("LOGIN_ATTEMPTS_KEPT", 3600))
    except (redis.RedisError, OSError) as exc:
        log.error("sign-in refused: the per-account attempt limit cannot reach Redis (%s)", exc)
        raise DomainError(_l("Signing in is unavailable for a moment. Please try again shortly."), 503)
    if wait:
        raise TooManyAttempts(int(wait))


def forget_attempts(username: str) -> None:
    """Start the account's count afresh after the right password."""
    try:
        redis_store.client.delete(_attempts_key(username))
    except (redis.RedisError, OSError) as exc:  # the count expires by itself
        log.warning("could not reset the sign-in attempts of %r (%s)", username, exc)


def check_password_limited(user: User, password: str) -> None:
    """Check a signed-in user's password (deleting the account, changing it) within the same limit."""
    claim_attempt(user.username)
    if not verify_password(user, password):
        raise DomainError(_l("That password is not right."), 403)
    forget_attempts(user.username)


def sign_in(username: str, password: str, device: str) -> SignedIn | None:
    """Return a new session of the user whose credentials these are; None if they are wrong.

    Each account has a limit of attempts (claim_attempt), whatever address they come from.
    Right credentials of a disabled account raise AccountClosed: only someone who knows the
    password learns that the account exists and why it cannot sign in.
    """
    claim_attempt(username)
    user = find_user_by_username(username)
    if not verify_password(user, password) or user is None:
        return None
    forget_attempts(username)
    if user.is_disabled:
        raise AccountClosed(_l("This account has been disabled. Ask an administrator to enable it."))
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_seen_at = utcnow()
    return start_session(user, device)


# -- signed-in sessions ---------------------------------------------------------------------

SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,24}")  # models.new_session_id
SEEN_EVERY = timedelta(minutes=5)  # "last seen" is written at most once per session per 5 minutes


@dataclass(frozen=True)
class SignedIn:
    """A signed-in request: what its cookies carry, the session they name, and its user."""

    cookie_id: str
    session: UserSession
    user: User


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _idle_limit() -> timedelta:
    return timedelta(days=current_app.config.get("SESSION_IDLE_DAYS", 30))


def start_session(user: User, device: str) -> SignedIn:
    """Record a signed-in browser for the user, committed; the user's get_id() then names it."""
    token = secrets.token_urlsafe(32)
    row = UserSession(user_id=user.id, token_hash=_token_hash(token), device=device[:64])
    db.session.add(row)
    # Sessions nobody used for the idle limit no longer sign in: clear the user's away here.
    db.session.execute(delete(UserSession).where(UserSession.user_id == user.id,
                                                 UserSession.last_seen_at < utcnow() - _idle_limit()))
    db.session.commit()
    user.session_token = token
    return SignedIn(user.get_id(), row, user)


def parse_cookie_id(cookie_id) -> tuple[int, str] | None:
    """Split what the cookies carry ("<user id>:<session token>"); None for anything else."""
    if not isinstance(cookie_id, str):
        return None
    user_id, _, token = cookie_id.partition(":")
    if not (user_id.isascii() and user_id.isdigit() and 0 < int(user_id) <= MAX_ROW_ID) or not 0 < len(token) <= 64:
        return None
    return int(user_id), token


def find_session(cookie_id: str) -> SignedIn | None:
    """Return the live session a cookie names, with its active user, or None.

    One indexed query that also loads the user, so pages read current_user without another.
    It runs in autocommit and leaves no transaction open: a send's one statement must find none
    (messages.send_connection), and SQLite must not keep a snapshot that a later write cannot
    upgrade. A session idle past the limit, or of a disabled account, is deleted on sight.
    """
    parsed = parse_cookie_id(cookie_id)
    if parsed is None:
        return None
    user_id, token = parsed
    with _autocommit() as own:
        found = db.session.execute(
            select(UserSession, User).join(User, User.id == UserSession.user_id)
            .where(UserSession.token_hash == _token_hash(token))).first()
        if found is None or found.User.id != user_id:
            return None
        row, user = found
        now = utcnow()
        if user.is_disabled or row.last_seen_at < now - _idle_limit():
            if own:  # (never inside a caller's transaction: it is not ours to commit)
                db.session.execute(delete(UserSession).where(UserSession.id == row.id))
            return None
        if own and row.last_seen_at < now - SEEN_EVERY:
            mark_seen(user_id, row.id, now)
    user.session_token = token
    return SignedIn(cookie_id, row, user)


@contextmanager
def _autocommit():
    """Run the block's statements each as its own transaction when none is open, and leave none
    open; yields whether it did (False: the block runs inside the caller's transaction)."""
    if db.session().in_transaction():
        yield False
        return
    db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    try:
        yield True
    except BaseException:
        db.session.rollback()
        raise
    db.session.commit()  # ends the session's transaction: in autocommit, nothing goes to the server


def mark_seen(user_id: int, session_id: str | None = None, now=None) -> None:
    """Write that an active user (and their session) was seen now; committed."""
    now = now or utcnow()
    with transaction():
        if session_id is not None:
            db.session.execute(update(UserSession).where(UserSession.id == session_id).values(last_seen_at=now)
                               .execution_options(synchronize_session=False))
            sync_loaded(UserSession, session_id, {"last_seen_at": now})
        db.session.execute(update(User).where(User.id == user_id, User.is_disabled.is_(False))
                           .values(last_seen_at=now).execution_options(synchronize_session=False))
    sync_loaded(User, user_id, {"last_seen_at": now})


def list_sessions(user_id: int) -> list[UserSession]:
    """Return the user's signed-in sessions, the most recently seen first."""
    return list(db.session.scalars(
        select(UserSession).where(UserSession.user_id == user_id,
                                  UserSession.last_seen_at >= utcnow() - _idle_limit())
        .order_by(UserSession.last_seen_at.desc(), UserSession.created_at.desc())).all())


def _end_sessions(*where) -> list[str]:
    """Delete the sessions matching `where`; their sockets close once the transaction commits."""
    ended = db.session.scalars(delete(UserSession).where(*where).returning(UserSession.id)
                               .execution_options(synchronize_session=False)).all()
    for session_id in ended:
        emit(SessionClosed(session_id))
    return list(ended)


def end_session(session_id: str) -> None:
    """Sign one session out for good: every cookie naming it stops working, its sockets close."""
    with transaction():
        _end_sessions(UserSession.id == session_id)


def revoke_session(user_id: int, session_id: str) -> None:
    """Sign out one of the user's own sessions, or raise NotFound."""
    with transaction():
        if not SESSION_ID_RE.fullmatch(session_id) or not _end_sessions(
                UserSession.id == session_id, UserSession.user_id == user_id):
            raise NotFound(_l("That session has already ended."))


def end_other_sessions(user_id: int, keep_session_id: str) -> int:
    """Sign out every session of the user but this one; return how many ended."""
    with transaction():
        return len(_end_sessions(UserSession.user_id == user_id, UserSession.id != keep_session_id))


def end_all_sessions(user_id: int) -> list[str]:
    """Sign out every session of the user. Does not commit: for the caller's transaction
    (an admin disabling the account, a password reset)."""
    return _end_sessions(UserSession.user_id == user_id)


def change_password(user: User, current: str, new: str, keep_session_id: str) -> int:
    """Change the user's password after checking the current one; end every other session.

    Returns how many sessions ended (in the same transaction as the new password).
    """
    check_password_limited(user, current)
    check_new_password(new, user.username)
    with transaction():
        user.password_hash = hash_password(new)
        ended = _end_sessions(UserSession.user_id == user.id, UserSession.id != keep_session_id)
    return len(ended)


def make_admin(user: User, new_password: str | None = None) -> int:
    """Make an existing user an active admin, keeping their password unless given a new one.

    A new password (it must pass the rules) signs out all their sessions; so does enabling a
    disabled account. Returns how many sessions ended.
    """
    if new_password is not None:
        check_new_password(new_password, user.username)
    with transaction():
        ended = end_all_sessions(user.id) if new_password is not None or user.is_disabled else []
        if new_password is not None:
            user.password_hash = hash_password(new_password)
        user.is_admin = True
        user.is_disabled = False
    return len(ended)


# -- profile and deletion -------------------------------------------------------------------

def update_profile(user: User, *, name: str, remark: str, avatar=None, background=None) -> User:
    """Change nickname, signature and pictures in one transaction."""
    name = check_display_name(name)
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
    Does not commit: callers wrap it in their transaction. Its sessions end with it (their
    cookies no longer sign in), its sockets close and the lists of those who knew them reload
    once that transaction commits.
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
    # The foreign key would cascade; deleting them here says so, whatever the database enforces.
    db.session.execute(delete(UserSession).where(UserSession.user_id == user.id))
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
    check_password_limited(user, password)
    with transaction():
        delete_user(user)
