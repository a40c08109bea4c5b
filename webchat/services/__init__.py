"""The domain layer: called by HTTP views, WebSocket frames, jobs and the CLI alike."""
from contextlib import contextmanager


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
        from flask_babel import lazy_gettext as _l

        from .accounts import is_active

        if not is_active(user_id):
            raise AccountClosed(_l("Please sign in.")) from None
        raise


def sync_loaded(model, pk, values: dict) -> None:
    """Give a row's new column values to its object if this session has it loaded.

    Sessions do not expire objects on commit, and an UPDATE statement does not reliably
    refresh loaded objects: a view that renders after an UPDATE must not show the old values.
    """
    from sqlalchemy.orm.attributes import set_committed_value

    from ..extensions import db

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
    from ..extensions import db

    try:
        yield
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
