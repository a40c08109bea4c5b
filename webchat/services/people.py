"""Finding people: by username, by id, by a search of usernames and nicknames."""
from __future__ import annotations

from typing import NamedTuple

from flask_babel import lazy_gettext as _l
from sqlalchemy import func, or_, select

from ..extensions import db
from ..models import User
from . import DomainError, NotFound, parse_id
from .conversation_list import conversation_list
from .text_rules import name_key

MAX_PICKED = 200  # people one form may name (a group's other members at most)


def like_pattern(query: str) -> str:
    """Return a case-folded LIKE pattern matching `query` anywhere, its wildcards escaped with '\\'."""
    return "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def find_user_by_username(username: str) -> User | None:
    """Return the user with this username, whatever its case."""
    return db.session.scalar(select(User).where(func.lower(User.username) == username.strip().lower()))


def active_users(ids, *order_by) -> list[User]:
    """The active (not disabled) users among these ids, in one query."""
    return list(db.session.scalars(
        select(User).where(User.id.in_(ids), User.is_disabled.is_(False)).order_by(*order_by)).all())


def too_many_people(limit: int) -> DomainError:
    """The refusal of a request naming more than `limit` people."""
    return DomainError(_l("Name at most %(n)d people at once.", n=limit), 422)


def ids_for_usernames(text: str, limit: int = MAX_PICKED) -> list[int]:
    """Resolve comma- or space-separated usernames to user ids, each once; unknown names are refused.

    More than `limit` different names are refused before any lookup: one query binds every name.
    """
    names: dict[str, str] = {}  # lower case -> as written (for the refusal)
    for name in (text or "").replace(",", " ").split():
        names.setdefault(name.lower(), name)
    if not names:
        return []
    if len(names) > limit:
        raise too_many_people(limit)
    users = db.session.scalars(select(User).where(func.lower(User.username).in_(list(names)))).all()
    found = {u.username.lower(): u.id for u in users}
    missing = [written for lower, written in names.items() if lower not in found]
    if missing:
        raise DomainError(_l("No user called %(name)s.", name=missing[0]), 422)
    return [found[lower] for lower in names]


class NameLabel(NamedTuple):
    """What a page shows with a person's nickname: their @username (its title), beside it when `shared`."""

    username: str
    shared: bool  # the nickname looks like another one's among the people compared


def name_labels(users) -> dict[int, NameLabel]:
    """Label each of these users (by id), telling apart those whose nicknames look the same (text_rules.name_key)."""
    keys = {user.id: (name_key(user.name), user.username) for user in users}
    owners: dict[str, set[int]] = {}
    for uid, (key, _username) in keys.items():
        owners.setdefault(key, set()).add(uid)
    return {uid: NameLabel(username, len(owners[key]) > 1) for uid, (key, username) in keys.items()}


def users_by_ids(raw_ids, limit: int = MAX_PICKED) -> list[User]:
    """Return the active users among these ids as given (garbage, unknown and disabled ones left out), by name."""
    wanted = set()
    for raw in list(raw_ids)[:limit]:
        try:
            wanted.add(parse_id(raw))
        except NotFound:
            continue
    return active_users(wanted, func.lower(User.name), User.id) if wanted else []


def search_users(query: str, exclude_id: int, limit: int = 20) -> list[User]:
    """Find active users by username or nickname."""
    query = (query or "").strip()
    if not query:
        return []
    pattern = like_pattern(query)
    return db.session.scalars(
        select(User)
        .where(User.id != exclude_id, User.is_disabled.is_(False))
        .where(or_(func.lower(User.username).like(pattern, escape="\\"),
                   func.lower(User.name).like(pattern, escape="\\")))
        .order_by(func.lower(User.username))
        .limit(limit)
    ).all()


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
