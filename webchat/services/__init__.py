"""The domain layer: called by HTTP views, WebSocket frames, jobs and the CLI alike.

Services know nothing of requests, sockets or blueprints: they raise DomainError for the caller
to turn into an answer, and emit events (webchat.events) that go out after their commit.
"""
from contextlib import contextmanager

from flask import current_app
from sqlalchemy.orm.attributes import set_committed_value

from ..extensions import db


class DomainError(Exception):
    """A refusal with a message meant for the user; status is the HTTP code to answer with."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class NotFound(DomainError):
    status = 404


class Forbidden(DomainError):
    status = 403


class ImageRefused(DomainError):
    """An uploaded file that is not an acceptable image (a form keeping it could never be sent)."""


class AccountClosed(DomainError):
    """The account acting is disabled or deleted (its session or socket outlived it).

    Callers sign it out rather than show a message: HTTP sends to sign-in, a socket closes 1008.
    Signing in is the exception: the right password of a disabled account gets this message.
    """

    status = 401


def sync_loaded(model, pk, values: dict) -> None:
    """Give a row's new column values to its object if this session has it loaded.

    Sessions do not expire objects on commit, and an UPDATE statement does not reliably
    refresh loaded objects: a view that renders after an UPDATE must not show the old values.
    """
    obj = db.session.identity_map.get(db.session.identity_key(model, pk))
    if obj is not None:
        for key, value in values.items():
            set_committed_value(obj, key, value)


MAX_ID = 2**63 - 1  # message ids (BIGINT)
MAX_ROW_ID = 2**31 - 1  # user and conversation ids (INTEGER)


def parse_id(raw, not_found: str = "Not found.", max_value: int = MAX_ROW_ID) -> int:
    """Return raw as a positive database id, or raise NotFound (garbage and huge numbers alike)."""
    try:
        value = int(raw)
    except (TypeError, ValueError, OverflowError):
        raise NotFound(not_found)
    if isinstance(raw, bool) or not 0 < value <= max_value:
        raise NotFound(not_found)
    return value


@contextmanager
def transaction():
    """Commit what the block wrote, or roll all of it back (and re-raise) if anything fails."""
    try:
        yield
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise


def sql_fast_paths() -> bool:
    """Say whether this database runs the PostgreSQL-only fast paths (the send's function, retention's batch).

    Each has a portable twin in Python, used on SQLite and when SQL_FAST_PATHS is off; a test
    runs both on the same histories and compares every row (tests/test_twins.py).
    """
    return db.session.get_bind().dialect.name == "postgresql" and current_app.config["SQL_FAST_PATHS"]
