"""The data model: users and their signed-in sessions, conversations, memberships, messages, read state,
images, audit."""
from __future__ import annotations

import secrets
from datetime import datetime, timezone

from flask_login import UserMixin
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .extensions import db

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC timestamp on every backend (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("naive datetime stored; use utcnow()")
            value = value.astimezone(timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def new_image_id() -> str:
    """Return an unguessable image id."""
    return secrets.token_urlsafe(18)


def new_session_id() -> str:
    """Return an unguessable id for a signed-in session (shown in its revoke URL, never a credential)."""
    return secrets.token_urlsafe(12)


class User(UserMixin, db.Model):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(String(255))
    avatar_id: Mapped[str | None] = mapped_column(String(32))
    background_id: Mapped[str | None] = mapped_column(String(32))
    remark: Mapped[str] = mapped_column(String(200), default="")
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    is_disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        # Usernames are unique whatever their case: "Alice" and "alice" are one account.
        Index("ux_users_username_lower", func.lower(username), unique=True),
        # Never reuse an id on SQLite (it would after the newest account is deleted): a session
        # names its user by id, and a deleted account's cookie must not name a newer account.
        {"sqlite_autoincrement": True},
    )

    # The signed-in session this object was loaded or signed in for (services.accounts). Not a
    # column: Flask-Login keeps get_id() in the session cookie and the "keep me signed in"
    # cookie, so both name that session, and deleting its row ends both.
    session_token = None

    @property
    def is_active(self) -> bool:  # Flask-Login refuses inactive users
        return not self.is_disabled

    def get_id(self) -> str:
        """Return what the cookies carry: "<user id>:<session token>" (Flask-Login's alternative tokens)."""
        if not self.session_token:
            raise RuntimeError("sign in through services.accounts.start_session, which gives the user a session")
        return f"{self.id}:{self.session_token}"

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username}>"


class UserSession(db.Model):
    """A signed-in browser. Its cookies (the session and "keep me signed in") carry a secret token;
    only the token's SHA-256 is stored, so a copy of this table signs nobody in. Signing out
    deletes the row, and with it every cookie that names it, wherever it was copied.
    """

    __tablename__ = "user_sessions"

    id: Mapped[str] = mapped_column(String(24), primary_key=True, default=new_session_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        # Every signed-in request finds its session by the token's hash: one index lookup.
        UniqueConstraint("token_hash", name="uq_user_sessions_token_hash"),
    )


class Image(db.Model):
    """An uploaded, re-encoded image: a profile picture (uploader) or a conversation's (conversation)."""

    __tablename__ = "images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_image_id)
    uploader_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    content_type: Mapped[str] = mapped_column(String(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    thumb: Mapped[bytes | None] = mapped_column(LargeBinary)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Conversation(db.Model):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    is_group: Mapped[bool] = mapped_column(Boolean, default=False)
    name: Mapped[str | None] = mapped_column(String(64))
    image_id: Mapped[str | None] = mapped_column(String(32))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # "lowid:highid" of a 1:1 conversation: the unique key that makes find-or-create race-free.
    direct_key: Mapped[str | None] = mapped_column(String(32), unique=True)
    last_message_id: Mapped[int | None] = mapped_column(BigId)
    last_message_text: Mapped[str] = mapped_column(String(200), default="")
    last_message_image: Mapped[bool] = mapped_column(Boolean, default=False)
    last_message_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # How many text messages it holds: a member's unread count is this minus their read_count.
    text_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="conversation", cascade="all, delete-orphan", passive_deletes=True
    )
    owner: Mapped[User | None] = relationship(foreign_keys=[owner_id])

    __table_args__ = (
        Index("ix_conversations_last_message_at", "last_message_at"),
        # Never reuse an id on SQLite: an open page of a deleted conversation must not receive a
        # newer conversation's messages.
        {"sqlite_autoincrement": True},
    )


class Membership(db.Model):
    """A user's place in a conversation; hidden while no message is newer than hidden_through."""

    __tablename__ = "memberships"

    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(16), default="member")  # owner | member
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Hiding stores a position instead of a flag, so a new message un-hides the row for
    # every member without writing one row per member.
    hidden_through: Mapped[int | None] = mapped_column(BigId)

    conversation: Mapped[Conversation] = relationship(back_populates="memberships")
    user: Mapped[User] = relationship()
    unread: Mapped[Unread] = relationship(
        back_populates="membership", cascade="all, delete-orphan", passive_deletes=True, uselist=False
    )

    def is_hidden(self, conversation: Conversation) -> bool:
        """Say whether this row is hidden from the member's list."""
        return self.hidden_through is not None and (conversation.last_message_id or 0) <= self.hidden_through


class Unread(db.Model):
    """A member's read pointer: text messages from others with a larger id are unread.

    read_count is how many of the conversation's text messages the member has read (up to the
    pointer, or their own), so the unread count is the conversation's text_count minus
    read_count: no counting of messages, and sending writes no row here for the recipients.
    services.conversations keeps both exact.
    """

    __tablename__ = "unreads"

    conversation_id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(primary_key=True)
    last_read_message_id: Mapped[int] = mapped_column(BigId, default=0)
    read_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    membership: Mapped[Membership] = relationship(back_populates="unread")

    __table_args__ = (
        ForeignKeyConstraint(
            ["conversation_id", "user_id"],
            ["memberships.conversation_id", "memberships.user_id"],
            ondelete="CASCADE",
        ),
    )


class Message(db.Model):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    sender_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), default="text")  # text | system
    event: Mapped[str | None] = mapped_column(String(16))  # system: created, added, removed, left, renamed
    body: Mapped[str] = mapped_column(Text, default="")
    image_id: Mapped[str | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    client_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    sender: Mapped[User | None] = relationship()
    image: Mapped[Image | None] = relationship()

    __table_args__ = (
        # Newest 50 of a conversation and keyset pagination (before=<mid>) walk this index.
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        # Retention deletes by age.
        Index("ix_messages_created_at", "created_at"),
        Index("ix_messages_sender_id", "sender_id"),
        # Idempotent send: one message per (sender, conversation, client_id).
        UniqueConstraint("sender_id", "conversation_id", "client_id", name="uq_messages_client_id"),
        # Never reuse an id on SQLite (it would after the newest rows are purged): clients
        # dedupe and replay by id.
        {"sqlite_autoincrement": True},
    )


class AuditLog(db.Model):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    actor_name: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class RetentionRun(db.Model):
    __tablename__ = "retention_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    days: Mapped[int] = mapped_column(Integer)
    messages_deleted: Mapped[int] = mapped_column(Integer, default=0)
    images_deleted: Mapped[int] = mapped_column(Integer, default=0)
    conversations_touched: Mapped[int] = mapped_column(Integer, default=0)
    batches: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(db.Float, default=0.0)
    trigger: Mapped[str] = mapped_column(String(16), default="cron")
