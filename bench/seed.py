"""Create benchmark users and conversations through webchat's own services (or as relay keys)."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

PASSWORD = "bench-password"


def recount_unread_of_app():
    """The app's recount_unread (services.read_state since issue 17, services.conversations before),
    or None for versions of the app without unread counters."""
    import importlib

    for name in ("webchat.services.read_state", "webchat.services.conversations"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "recount_unread"):
            return module.recount_unread
    return None


@dataclass
class Conv:
    cid: int  # the conversation id (webchat) or an index (relay)
    members: list[int]  # user indexes into Topology.users
    is_group: bool


@dataclass
class BenchUser:
    index: int
    uid: int  # webchat user id; for the relay, the key is str(index)
    username: str


@dataclass
class Topology:
    users: list[BenchUser] = field(default_factory=list)
    directs: list[Conv] = field(default_factory=list)
    groups: list[Conv] = field(default_factory=list)


def plan(n_users: int, directs_per_user: int, n_groups: int, group_size: int) -> tuple[list[tuple[int, int]],
                                                                                         list[list[int]]]:
    """Return the 1:1 pairs and the group member lists (as user indexes) of a benchmark world.

    Each user is in `directs_per_user` 1:1 conversations (a ring: i with i+1, i+2, ...), and the
    groups are consecutive blocks of `group_size` users, so fan-out is the same on every run.
    """
    pairs: set[tuple[int, int]] = set()
    for step in range(1, directs_per_user // 2 + 1):
        for i in range(n_users):
            j = (i + step) % n_users
            if i != j:
                pairs.add((min(i, j), max(i, j)))
    if directs_per_user % 2:  # an odd count: add a perfect matching
        for i in range(0, n_users - 1, 2):
            pairs.add((i, i + 1))
    groups = []
    size = min(group_size, n_users)
    for g in range(n_groups):
        start = (g * size) % n_users
        groups.append([(start + k) % n_users for k in range(size)])
    return sorted(pairs), groups


def relay_world(n_users: int, directs_per_user: int, n_groups: int, group_size: int) -> Topology:
    """Return the same world for the relay: keys are user indexes, no database."""
    pairs, groups = plan(n_users, directs_per_user, n_groups, group_size)
    users = [BenchUser(i, i, str(i)) for i in range(n_users)]
    directs = [Conv(n, [a, b], False) for n, (a, b) in enumerate(pairs)]
    groups_out = [Conv(len(directs) + n, members, True) for n, members in enumerate(groups)]
    return Topology(users, directs, groups_out)


def make_app(database_url: str, redis_url: str):
    """Return a webchat app bound to the bench database and Redis (used only in this process)."""
    from webchat import create_app
    from webchat.config import database_url_from_env

    return create_app({
        "SQLALCHEMY_DATABASE_URI": database_url_from_env(database_url),
        "REDIS_URL": redis_url,
        "SECRET_KEY": "bench-secret",
        "RATELIMIT_ENABLED": False,
        "PROXY_FIX": 0,
    })


def create_users(n: int, prefix: str | None = None) -> list[BenchUser]:
    """Insert n users sharing one password hash (argon2 once, not n times); return them."""
    from webchat.extensions import db
    from webchat.models import User
    from webchat.services.accounts import hash_password

    prefix = prefix or "b" + secrets.token_hex(3)
    password_hash = hash_password(PASSWORD)
    rows = [User(username=f"{prefix}_{i}", name=f"Bench {i}", password_hash=password_hash) for i in range(n)]
    db.session.add_all(rows)
    db.session.commit()
    return [BenchUser(i, row.id, row.username) for i, row in enumerate(rows)]


def webchat_world(app, n_users: int, directs_per_user: int, n_groups: int, group_size: int) -> Topology:
    """Create the users, 1:1 conversations and groups with webchat's services; return the world."""
    from webchat.extensions import db
    from webchat.models import User
    from webchat.services.conversations import create_group, find_or_create_direct

    pairs, groups = plan(n_users, directs_per_user, n_groups, group_size)
    with app.test_request_context("/"):
        users = create_users(n_users)
        rows = {u.id: u for u in db.session.query(User).filter(User.id.in_([u.uid for u in users]))}
        by_index = [rows[u.uid] for u in users]
        directs = []
        for a, b in pairs:
            conversation = find_or_create_direct(by_index[a], by_index[b])
            directs.append(Conv(conversation.id, [a, b], False))
        group_convs = []
        for n, members in enumerate(groups):
            owner, others = by_index[members[0]], [by_index[m].id for m in members[1:]]
            conversation = create_group(owner, f"Bench group {n}", others)
            group_convs.append(Conv(conversation.id, members, True))
        db.session.remove()
    return Topology(users, directs, group_convs)


def put_backlog(cid: int, sender_id: int, n: int) -> None:
    """Bulk-insert `n` messages from a member into a conversation, unread by all its other members.

    In an app context; no commit. The unread counters are rebuilt from the rows afterwards (on
    versions of the app that keep them).
    """
    from sqlalchemy import text

    from webchat.extensions import db

    db.session.execute(text("""
        INSERT INTO messages (conversation_id, sender_id, kind, body, created_at)
        SELECT :cid, :sender, 'text', 'Backlog message ' || g, now() FROM generate_series(1, :n) AS g
    """), {"cid": cid, "sender": sender_id, "n": n})
    db.session.execute(text("""
        UPDATE conversations SET last_message_id = (SELECT max(id) FROM messages WHERE conversation_id = :cid),
               last_message_text = 'Backlog message', last_message_at = now() WHERE id = :cid
    """), {"cid": cid})
    db.session.execute(text("""
        UPDATE unreads SET last_read_message_id = (SELECT last_message_id FROM conversations WHERE id = :cid)
        WHERE conversation_id = :cid AND user_id = :sender
    """), {"cid": cid, "sender": sender_id})
    recount = recount_unread_of_app()
    if recount is not None:  # the app keeps unread counters (since 2026-11-27)
        recount([cid])


def add_backlog(app, world: Topology, per_group: int) -> None:
    """Put `per_group` messages from its owner in every group, unread by all its other members.

    A group whose members do not all keep up (the usual case) has a backlog; what a send costs
    must not grow with it.
    """
    from sqlalchemy import text

    from webchat.extensions import db

    with app.app_context():
        for group in world.groups:
            put_backlog(group.cid, world.users[group.members[0]].uid, per_group)
        db.session.commit()
        db.session.execute(text("ANALYZE"))
        db.session.commit()
        db.session.remove()
