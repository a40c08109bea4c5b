"""Administration: dashboard figures, managing users and conversations, and the audit log.

Every change writes an AuditLog row in the same transaction; sockets are closed, members told
and jobs queued only after that transaction commits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

import redis
from croniter import CroniterError, croniter
from flask import current_app
from flask_babel import lazy_gettext as _l
from rq import Queue, Worker
from sqlalchemy import func, or_, select

from ..events import UserClosed, emit
from ..extensions import db, redis_store
from ..models import AuditLog, Conversation, Image, Membership, Message, RetentionRun, User, utcnow
from ..presence import online_user_ids
from . import DomainError, NotFound, accounts, conversations, retention, transaction
from .membership import members_of
from .people import like_pattern

log = logging.getLogger(__name__)
PER_PAGE = 25
AUDIT_ON_DASHBOARD = 20
USER_CONVERSATIONS_SHOWN = 50
PURGE_JOB = "webchat.jobs.purge_expired_messages_job"  # jobs.purge_expired_messages_job


# -- small value types ------------------------------------------------------------------------

@dataclass
class Page:
    """One page of a search: the rows, where we are, and how many there are in all."""

    items: list
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def has_prev(self) -> bool:
        return self.page > 1

    @property
    def has_next(self) -> bool:
        return self.page < self.pages


@dataclass
class RetentionStatus:
    days: int
    cron: str
    last_run: RetentionRun | None
    next_run: datetime | None  # local time; None when the cron string is invalid


@dataclass
class QueueStatus:
    name: str
    available: bool
    queued: int = 0
    failed: int = 0
    workers: int = 0


@dataclass
class Dashboard:
    users_total: int
    users_active_today: int
    users_online: int | None  # None: Redis is unreachable
    users_disabled: int
    admins: int
    conversations_direct: int
    conversations_group: int
    messages_today: int
    messages_total: int
    images: int
    image_bytes: int
    retention: RetentionStatus
    queue: QueueStatus
    audit: list[AuditLog]


@dataclass
class UserRow:
    user: User
    conversations: int
    online: bool


@dataclass
class ConversationSummary:
    conversation: Conversation
    title: str
    member_count: int
    message_count: int


@dataclass
class UserDetails:
    user: User
    online: bool
    direct_count: int
    group_count: int
    messages_sent: int
    conversations: list[ConversationSummary] = field(default_factory=list)

    @property
    def conversation_count(self) -> int:
        return self.direct_count + self.group_count


@dataclass
class ConversationDetails:
    summary: ConversationSummary
    members: list[tuple[Membership, User]]
    images: int
    image_bytes: int

    @property
    def conversation(self) -> Conversation:
        return self.summary.conversation


# -- dashboard --------------------------------------------------------------------------------

def start_of_today(now: datetime | None = None) -> datetime:
    """Return the last local midnight as a UTC-comparable aware datetime."""
    local = (now or utcnow()).astimezone()
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def next_retention_run(cron: str, now: datetime | None = None) -> datetime | None:
    """Return when the cron string next fires, in local time (rq cron reads it so), or None if invalid."""
    try:
        return croniter(cron, (now or utcnow()).astimezone()).get_next(datetime)
    except (CroniterError, ValueError, KeyError):
        return None


def queue_status(queue_name: str) -> QueueStatus:
    """Return how many jobs wait and failed on the RQ queue, and how many workers serve it."""
    try:
        queue = Queue(queue_name, connection=redis_store.client)
        return QueueStatus(queue_name, True, queue.count, queue.failed_job_registry.count,
                           Worker.count(connection=redis_store.client, queue=queue))
    except (redis.RedisError, OSError) as exc:
        # The dashboard is most wanted when something is down: show it without the queue.
        log.warning("queue status unavailable: %s", exc)
        return QueueStatus(queue_name, False)


def _count(model, *where):
    return select(func.count()).select_from(model).where(*where).scalar_subquery()


def dashboard() -> Dashboard:
    """Gather the dashboard's figures (one aggregate query for the counts)."""
    config = current_app.config
    today = start_of_today()
    # One round trip: every count is a scalar subquery of a single SELECT.
    counts = db.session.execute(select(
        _count(User).label("users"),
        _count(User, User.last_seen_at >= today).label("active_today"),
        _count(User, User.is_disabled.is_(True)).label("disabled"),
        _count(User, User.is_admin.is_(True), User.is_disabled.is_(False)).label("admins"),
        _count(Conversation, Conversation.is_group.is_(False)).label("direct"),
        _count(Conversation, Conversation.is_group.is_(True)).label("groups"),
        _count(Message, Message.kind == "text", Message.created_at >= today).label("messages_today"),
        _count(Message, Message.kind == "text").label("messages_total"),
        _count(Image).label("images"),
        select(func.coalesce(func.sum(Image.size), 0)).scalar_subquery().label("image_bytes"),
    )).one()
    queue = queue_status(config["RQ_QUEUE"])
    online = None
    if queue.available:  # one Redis timeout is enough when it is down
        active_ids = db.session.scalars(select(User.id).where(User.is_disabled.is_(False))).all()
        online = len(online_user_ids(redis_store.client, active_ids))
    return Dashboard(
        users_total=counts.users,
        users_active_today=counts.active_today,
        users_online=online,
        users_disabled=counts.disabled,
        admins=counts.admins,
        conversations_direct=counts.direct,
        conversations_group=counts.groups,
        messages_today=counts.messages_today,
        messages_total=counts.messages_total,
        images=counts.images,
        image_bytes=int(counts.image_bytes or 0),
        retention=RetentionStatus(config["RETENTION_DAYS"], config["RETENTION_CRON"], retention.last_run(),
                                  next_retention_run(config["RETENTION_CRON"])),
        queue=queue,
        audit=recent_audit(),
    )


def recent_audit(limit: int = AUDIT_ON_DASHBOARD) -> list[AuditLog]:
    """Return the newest audit log entries."""
    return db.session.scalars(select(AuditLog).order_by(AuditLog.id.desc()).limit(limit)).all()


def run_retention_now(actor: User):
    """Queue a retention purge now and record who asked; return the RQ job."""
    _audit(actor, "run_retention", f"retention ({current_app.config['RETENTION_DAYS']} days)")
    db.session.commit()
    try:
        # By name: the worker imports webchat.jobs, the app never does.
        queue = Queue(current_app.config["RQ_QUEUE"], connection=redis_store.client)
        return queue.enqueue(PURGE_JOB, None, "admin", job_timeout=3600)
    except (redis.RedisError, OSError) as exc:
        log.warning("could not queue the purge: %s", exc)
        raise DomainError(_l("The job queue is unavailable right now. Try again later."), 503)


# -- audit ------------------------------------------------------------------------------------

def _audit(actor: User, action: str, target: str) -> None:
    db.session.add(AuditLog(actor_id=actor.id, actor_name=actor.username, action=action, target=target[:120]))


def _user_label(user: User) -> str:
    return f"user {user.id} ({user.username})"


def _conversation_label(summary: ConversationSummary) -> str:
    kind = "group" if summary.conversation.is_group else "1:1"
    return f"{kind} {summary.conversation.id} ({summary.title})"


# -- users ------------------------------------------------------------------------------------

def _page_number(page, total: int, per_page: int) -> int:
    try:
        page = int(page)
    except (TypeError, ValueError):
        page = 1
    last = max(1, -(-total // per_page))
    return min(max(page, 1), last)


def _fetch_page(statement, page, per_page: int) -> tuple[list, int, int]:
    """One page of an ordered statement's rows (the page number kept within what exists) and the total."""
    total = db.session.scalar(select(func.count()).select_from(statement.order_by(None).subquery()))
    page = _page_number(page, total, per_page)
    items = db.session.scalars(statement.limit(per_page).offset((page - 1) * per_page)).all()
    return items, page, total


def search_users(query: str = "", page=1, per_page: int = PER_PAGE) -> Page:
    """Return a page of users whose username or nickname contains the query (disabled ones too)."""
    base = select(User)
    query = (query or "").strip()
    if query:
        pattern = like_pattern(query)
        base = base.where(or_(func.lower(User.username).like(pattern, escape="\\"),
                              func.lower(User.name).like(pattern, escape="\\")))
    users, page, total = _fetch_page(base.order_by(func.lower(User.username)), page, per_page)
    ids = [u.id for u in users]
    counts = dict(db.session.execute(
        select(Membership.user_id, func.count()).where(Membership.user_id.in_(ids)).group_by(Membership.user_id)
    ).all()) if ids else {}
    online = online_user_ids(redis_store.client, ids)
    return Page([UserRow(u, counts.get(u.id, 0), u.id in online) for u in users], page, per_page, total)


def get_user(uid) -> User:
    """Return the user with this id, or raise NotFound."""
    try:
        user = db.session.get(User, int(uid))
    except (TypeError, ValueError):
        user = None
    if user is None:
        raise NotFound(_l("No such user."))
    return user


def user_details(uid) -> UserDetails:
    """Return one user with their conversation counts, messages sent and presence."""
    user = get_user(uid)
    kinds = dict(db.session.execute(
        select(Conversation.is_group, func.count())
        .join(Membership, Membership.conversation_id == Conversation.id)
        .where(Membership.user_id == user.id).group_by(Conversation.is_group)
    ).all())
    sent = db.session.scalar(select(func.count()).select_from(Message).where(
        Message.sender_id == user.id, Message.kind == "text"))
    recent = db.session.scalars(
        select(Conversation).join(Membership, Membership.conversation_id == Conversation.id)
        .where(Membership.user_id == user.id)
        .order_by(func.coalesce(Conversation.last_message_at, Conversation.created_at).desc(), Conversation.id.desc())
        .limit(USER_CONVERSATIONS_SHOWN)
    ).all()
    return UserDetails(user, user.id in online_user_ids(redis_store.client, [user.id]),
                       kinds.get(False, 0), kinds.get(True, 0), sent, _summaries(recent))


def _lock_active_admins() -> list[int]:
    # FOR UPDATE serialises concurrent demotions on PostgreSQL, so two admins cannot each
    # remove the other and leave none (SQLite serialises writers by itself).
    return db.session.scalars(
        select(User.id).where(User.is_admin.is_(True), User.is_disabled.is_(False)).with_for_update()
    ).all()


def _check_not_last_admin(actor: User, user: User) -> None:
    """Refuse a change that would take away the last active admin."""
    if not user.is_admin or user.is_disabled:
        return
    if set(_lock_active_admins()) - {user.id}:
        return
    if user.id == actor.id:
        raise DomainError(_l("You are the only active admin: make someone else an admin first."), 409)
    raise DomainError(_l("This is the only active admin: make someone else an admin first."), 409)


def set_disabled(actor: User, uid, disabled: bool) -> User:
    """Disable (close their sockets, refuse sign-in) or enable a user."""
    user = get_user(uid)
    if user.is_disabled == disabled:
        return user

    with transaction():
        if disabled:
            _check_not_last_admin(actor, user)
        user.is_disabled = disabled
        _audit(actor, "disable_user" if disabled else "enable_user", _user_label(user))
        if disabled:
            accounts.end_all_sessions(user.id)  # re-enabling must not revive them
            emit(UserClosed(user.id, 1008))
    return user


def set_admin(actor: User, uid, grant: bool) -> User:
    """Grant or revoke the admin flag (never from the last active admin)."""
    user = get_user(uid)
    if user.is_admin == grant:
        return user

    with transaction():
        if not grant:
            _check_not_last_admin(actor, user)
        user.is_admin = grant
        _audit(actor, "grant_admin" if grant else "revoke_admin", _user_label(user))
    return user


def delete_user(actor: User, uid) -> list[int]:
    """Delete a user like account deletion does; return the ids of users who knew them."""
    user = get_user(uid)
    with transaction():
        _check_not_last_admin(actor, user)
        _audit(actor, "delete_user", _user_label(user))
        affected = accounts.delete_user(user)  # its sockets close after the commit
    return affected


# -- conversations ----------------------------------------------------------------------------

def _summaries(rows: list[Conversation]) -> list[ConversationSummary]:
    """Name and count a batch of conversations in three queries, whatever their number."""
    ids = [c.id for c in rows]
    if not ids:
        return []
    member_counts = dict(db.session.execute(
        select(Membership.conversation_id, func.count()).where(Membership.conversation_id.in_(ids))
        .group_by(Membership.conversation_id)).all())
    message_counts = dict(db.session.execute(
        select(Message.conversation_id, func.count()).where(Message.conversation_id.in_(ids), Message.kind == "text")
        .group_by(Message.conversation_id)).all())
    direct_ids = [c.id for c in rows if not c.is_group]
    names: dict[int, list[str]] = {}
    if direct_ids:
        for cid, username in db.session.execute(
                select(Membership.conversation_id, User.username).join(User, User.id == Membership.user_id)
                .where(Membership.conversation_id.in_(direct_ids)).order_by(User.username)):
            names.setdefault(cid, []).append(username)
    out = []
    for c in rows:
        title = (c.name or "") if c.is_group else " ↔ ".join(names.get(c.id, []))
        out.append(ConversationSummary(c, title, member_counts.get(c.id, 0), message_counts.get(c.id, 0)))
    return out


def search_conversations(query: str = "", page=1, per_page: int = PER_PAGE) -> Page:
    """Return a page of conversations with a member (username or nickname) or group name matching."""
    base = select(Conversation)
    query = (query or "").strip()
    if query:
        pattern = like_pattern(query)
        with_member = (select(Membership.conversation_id).join(User, User.id == Membership.user_id)
                       .where(or_(func.lower(User.username).like(pattern, escape="\\"),
                                  func.lower(User.name).like(pattern, escape="\\"))))
        base = base.where(or_(Conversation.id.in_(with_member),
                              func.lower(Conversation.name).like(pattern, escape="\\")))
    rows, page, total = _fetch_page(
        base.order_by(func.coalesce(Conversation.last_message_at, Conversation.created_at).desc(),
                      Conversation.id.desc()), page, per_page)
    return Page(_summaries(rows), page, per_page, total)


def get_conversation(cid) -> Conversation:
    """Return any conversation by id, or raise NotFound."""
    try:
        conversation = db.session.get(Conversation, int(cid))
    except (TypeError, ValueError):
        conversation = None
    if conversation is None:
        raise NotFound(_l("No such conversation."))
    return conversation


def conversation_details(cid) -> ConversationDetails:
    """Return a conversation's members, message count and image storage (never message content)."""
    conversation = get_conversation(cid)
    images, image_bytes = db.session.execute(
        select(func.count(), func.coalesce(func.sum(Image.size), 0)).select_from(Image)
        .where(Image.conversation_id == conversation.id)
    ).one()
    return ConversationDetails(_summaries([conversation])[0], members_of(conversation.id),
                               images, int(image_bytes or 0))


def delete_conversation(actor: User, cid) -> list[int]:
    """Delete a conversation with its messages and images; members' lists update live."""
    summary = _summaries([get_conversation(cid)])[0]
    # The audit row is pending in the session, so delete_conversation's commit writes both at once.
    _audit(actor, "delete_conversation", _conversation_label(summary))
    return conversations.delete_conversation(summary.conversation.id)
