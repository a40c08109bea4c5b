"""PostgreSQL's SQL fast paths and their Python twins write the same rows, on random histories.

Two apps run the same history: one with SQL_FAST_PATHS (a send is one call of webchat_send(), a
retention batch one statement) on the test database, one with the Python paths on a twin database
next to it. A fake clock and numbered image ids make every column comparable.
"""
from __future__ import annotations

import io
import itertools
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from flask_migrate import upgrade
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from werkzeug.datastructures import FileStorage

import webchat.models
from tests.conftest import image_bytes, make_user
from webchat import create_app
from webchat.config import TestConfig
from webchat.events import emit
from webchat.extensions import db
from webchat.models import Conversation, Membership, Message, User
from webchat.realtime.hub import hub
from webchat.services import DomainError, NotFound, accounts, retention, sql_fast_paths, transaction
from webchat.services import conversations as convs
from webchat.services import images as images_service
from webchat.services import messages as msgs
from webchat.services import read_state as reads
from webchat.services.membership import get_conversation_for

pytestmark = pytest.mark.skipif(not os.environ.get("TEST_DATABASE_URL"),
                                reason="the SQL fast paths run on PostgreSQL only: set TEST_DATABASE_URL")

USERS, GROUP = 4, 3  # conversations: 1 = users 1 and 2, 2 = users 2 and 3, 3 = a group of 1 (owner), 2, 3
START = datetime(2030, 1, 1, tzinfo=timezone.utc)
PNG = image_bytes(size=(8, 8))
COMPARED = {"conversations": ("id",), "memberships": ("conversation_id", "user_id"),
            "unreads": ("conversation_id", "user_id"), "messages": ("id",), "images": ("id",)}


@pytest.fixture(scope="module")
def twins(app):
    """App F (fast paths, the test database) and app P (Python paths, the test database's twin)."""
    url = sa.engine.make_url(app.config["SQLALCHEMY_DATABASE_URI"])
    if url.get_backend_name() != "postgresql":
        pytest.skip("the SQL fast paths run on PostgreSQL only")
    twin = url.database + "_twin"
    drop = f'DROP DATABASE IF EXISTS "{twin}" WITH (FORCE)'  # FORCE: the pool's connections go too
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(drop))
        conn.execute(text(f'CREATE DATABASE "{twin}"'))
    fast_paths, hub_state = app.config["SQL_FAST_PATHS"], (hub.app, hub._slots)
    try:
        config = TestConfig()
        config.SQLALCHEMY_DATABASE_URI = url.set(database=twin).render_as_string(hide_password=False)
        config.REDIS_URL, config.SQL_FAST_PATHS = app.config["REDIS_URL"], False
        python_app = create_app(config)
        hub.app, hub._slots = hub_state  # create_app points the process's hub at its app: give it back
        app.config["SQL_FAST_PATHS"] = True  # whatever the environment says
        with python_app.app_context():
            upgrade()
        for each, fast in ((app, True), (python_app, False)):
            with each.app_context():
                assert sql_fast_paths() is fast
        yield app, python_app
        with python_app.app_context():
            db.engine.dispose()
    finally:
        app.config["SQL_FAST_PATHS"] = fast_paths
        hub.app, hub._slots = hub_state
        with admin.connect() as conn:
            conn.execute(text(drop))
        admin.dispose()


class Clock:
    """A fake utcnow: starts at START and moves one second a call."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@contextmanager
def deterministic(clock: Clock):
    """Make webchat read the time from `clock` and number new images img1, img2, ..."""
    original = webchat.models.utcnow

    class ClockDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return clock()

    numbers = itertools.count(1)
    with pytest.MonkeyPatch.context() as mp:
        for name, module in list(sys.modules.items()):  # every `from ..models import utcnow`
            if name.startswith("webchat") and getattr(module, "utcnow", None) is original:
                mp.setattr(module, "utcnow", clock)
        # Column defaults (created_at, joined_at, ...) hold the original utcnow, which reads this.
        mp.setattr(webchat.models, "datetime", ClockDatetime)
        mp.setattr(images_service, "new_image_id", lambda: f"img{next(numbers)}")
        assert msgs.utcnow is clock and reads.utcnow is clock and retention.utcnow is clock
        yield


def empty_database(app) -> None:
    """TRUNCATE every table and restart the ids (a background reader may deadlock it: try again)."""
    tables = ", ".join(t.name for t in reversed(db.metadata.sorted_tables))
    with app.app_context():
        for attempt in range(5):
            try:
                db.session.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
                db.session.commit()
                return
            except OperationalError:
                db.session.rollback()
                if attempt == 4:
                    raise
                time.sleep(0.2)


def create_people_and_conversations() -> None:
    users = [make_user(f"user{i}") for i in range(1, USERS + 1)]
    convs.find_or_create_direct(users[0], users[1])
    convs.find_or_create_direct(users[1], users[2])
    convs.create_group(users[0], "Group", [users[1].id, users[2].id])


def member(cid: int, user: int, as_member: bool) -> int:
    """`user`; with as_member, the conversation's current member that `user` picks (if any are left)."""
    ids = db.session.scalars(select(Membership.user_id).where(Membership.conversation_id == cid)
                             .order_by(Membership.user_id)).all() if as_member else []
    db.session.commit()  # nothing left open: a send runs in autocommit, as a socket frame's does
    return ids[user % len(ids)] if ids else user


def group_and_owner() -> tuple[Conversation, User]:
    group = db.session.get(Conversation, GROUP)
    if group is None or group.owner_id is None:
        raise NotFound("no group or no owner")
    return group, db.session.get(User, group.owner_id)


def set_message_sequence(value: int) -> None:
    db.session.execute(text("SELECT setval('messages_id_seq', :v)"), {"v": value})
    db.session.commit()


def send(clock, cid, user, as_member, body, client_id, with_image):
    upload = FileStorage(io.BytesIO(PNG), filename="a.png") if with_image else None
    message, new = msgs.send_to(member(cid, user, as_member), cid, body, image=upload, client_id=client_id)
    return message.id, new


def late_send(clock, cid, first, second):
    """Two members' sends where the second gets the smaller id, as if it committed late."""
    sender, late_sender = member(cid, first, True), member(cid, second, True)
    reserved = db.session.scalar(text("SELECT last_value FROM messages_id_seq"))
    try:
        set_message_sequence(reserved + 3)
        winner, _ = msgs.send_to(sender, cid, "first in")
        set_message_sequence(reserved)
        late, _ = msgs.send_to(late_sender, cid, "committed late")
        return winner.id, late.id
    finally:
        set_message_sequence(reserved + 4)  # past both: later sends are in order again


def read(clock, cid, user, as_member, back):
    """Mark read up to the newest message, or to the one `back` messages before it."""
    uid = member(cid, user, as_member)
    conversation, membership = get_conversation_for(uid, cid, with_unread=True)
    upto = db.session.scalar(select(Message.id).where(Message.conversation_id == cid)
                             .order_by(Message.id.desc()).offset(back).limit(1)) if back else None
    return reads.mark_read(uid, conversation, upto=upto, unread=membership.unread)


def hide(clock, cid, user, as_member):
    uid = member(cid, user, as_member)
    conversation, membership = get_conversation_for(uid, cid)
    convs.hide(db.session.get(User, uid), conversation, membership)


def add(clock, user):
    group, owner = group_and_owner()
    return [u.id for u in convs.add_members(owner, group, [user])]


def remove(clock, user):
    group, owner = group_and_owner()
    convs.remove_member(owner, group, user)


def leave(clock, user):
    group, _membership = get_conversation_for(user, GROUP)
    convs.leave(db.session.get(User, user), group)


def delete_account(clock, user):
    victim = db.session.get(User, user)
    if victim is None:
        raise NotFound("no such user")
    with transaction():
        return accounts.delete_user(victim)


def disband(clock, cid):
    conversation = db.session.get(Conversation, cid)
    if conversation is None:
        raise NotFound("no such conversation")
    if conversation.is_group:
        return convs.disband(group_and_owner()[1], conversation)
    return convs.delete_conversation(cid)


def purge(clock, days, seconds_back, batch_size):
    """Move the clock `days` on, less `seconds_back`: the messages older than that expire."""
    clock.now += timedelta(days=days, seconds=-seconds_back)
    result = retention.purge_expired_messages(days, batch_size=batch_size)
    return None if result is None else (result.messages, result.images, result.conversations, result.batches)


OPERATIONS = {f.__name__: f for f in (send, late_send, read, hide, add, remove, leave, delete_account, disband, purge)}


def run_history(app, history) -> tuple[list, list]:
    """Create the users and conversations and run the history on this app.

    Returns each step's result (or its refusal's type) and each send's event, which carries what
    the write returned: every member's hidden position and unread count.
    """
    outcomes, sent, clock = [], [], Clock()

    def record(event):
        sent.append(replace(event, members=sorted(event.members, key=lambda m: m.user_id),
                            people=sorted(event.people, key=lambda p: p.id)))  # in no particular order
        emit(event)

    with deterministic(clock), pytest.MonkeyPatch.context() as mp:
        mp.setattr(msgs, "emit", record)
        with app.test_request_context("/"):
            create_people_and_conversations()
        for name, *args in history:
            with app.test_request_context("/"):
                try:
                    outcomes.append(OPERATIONS[name](clock, *args))
                except DomainError as exc:  # anything else fails the test
                    db.session.rollback()
                    outcomes.append(type(exc).__name__)
    return outcomes, sent


def snapshot(app) -> dict[str, dict[tuple, dict]]:
    """Every row of the compared tables, every column, by primary key."""
    with app.app_context():
        tables = {}
        for table, key in COMPARED.items():
            rows = db.session.execute(text(f"SELECT * FROM {table} ORDER BY {', '.join(key)}")).mappings()
            tables[table] = {tuple(row[k] for k in key): dict(row) for row in rows}
        db.session.rollback()
    return tables


def differences(fast: dict, python: dict) -> list[str]:
    """Say which rows differ between two snapshots ([] when they are identical)."""
    def shown(row):
        return row and {k: f"<{len(v)} bytes>" if isinstance(v, bytes) else v for k, v in row.items()}

    found = []
    for table, rows in fast.items():
        for key in sorted(rows.keys() | python[table].keys()):
            if rows.get(key) != python[table].get(key):
                found.append(f"{table} {key}: fast {shown(rows.get(key))} != python {shown(python[table].get(key))}")
    return found


def run_on_both(twins, history) -> list[tuple[list, list]]:
    """Run the history on both apps, each from empty tables (ids start at 1 on both)."""
    runs = []
    for app in twins:
        empty_database(app)
        runs.append(run_history(app, history))
    return runs


# as_member: mostly a current member of the conversation acts; otherwise any user (non-members are refused).
users, conversations, as_member = st.integers(1, USERS), st.integers(1, GROUP), st.sampled_from([True] * 3 + [False])
STEPS = {  # name: (weight, the step with its arguments)
    "send": (8, st.tuples(st.just("send"), conversations, users, as_member,
                          st.sampled_from(["hi", "hello", " x ", " "]), st.sampled_from([None, None, "c1", "c2"]),
                          st.sampled_from([False] * 3 + [True]))),
    "late_send": (2, st.tuples(st.just("late_send"), conversations, users, users)),
    "read": (4, st.tuples(st.just("read"), conversations, users, as_member, st.integers(0, 3))),
    "hide": (1, st.tuples(st.just("hide"), conversations, users, as_member)),
    "group": (2, st.tuples(st.sampled_from(["add", "remove", "leave"]), users)),
    "purge": (2, st.tuples(st.just("purge"), st.integers(1, 3), st.integers(0, 15), st.integers(1, 4))),
    "delete_account": (1, st.tuples(st.just("delete_account"), users)),
    "disband": (1, st.tuples(st.just("disband"), conversations)),
}
steps = st.sampled_from([name for name, (weight, _) in STEPS.items() for _ in range(weight)]).flatmap(
    lambda name: STEPS[name][1])


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(history=st.lists(steps, min_size=10, max_size=40))
@example(history=[("send", 3, 1, True, "hi", "c1", True), ("late_send", 3, 1, 2), ("read", 3, 2, True, 0),
                  ("send", 3, 1, True, "hi", "c1", False), ("purge", 1, 3, 2), ("read", 3, 0, True, 1),
                  ("send", 1, 3, False, "not mine", None, False), ("delete_account", 2)])
def test_the_fast_paths_and_their_python_twins_write_the_same_rows(twins, history):
    (fast_outcomes, fast_sent), (python_outcomes, python_sent) = run_on_both(twins, history)
    assert fast_outcomes == python_outcomes
    assert fast_sent == python_sent
    assert differences(snapshot(twins[0]), snapshot(twins[1])) == []


def test_the_comparison_reports_one_read_count_off_by_one(twins):
    run_on_both(twins, [("send", 3, 2, True, "hi", None, False), ("read", 3, 3, True, 0)])
    assert differences(snapshot(twins[0]), snapshot(twins[1])) == []
    with twins[1].app_context():
        db.session.execute(text("UPDATE unreads SET read_count = read_count + 1 "
                                "WHERE conversation_id = :c AND user_id = 3"), {"c": GROUP})
        db.session.commit()
    found = differences(snapshot(twins[0]), snapshot(twins[1]))
    assert len(found) == 1 and found[0].startswith(f"unreads ({GROUP}, 3)"), found
