"""Unread counts come from counters (conversations.text_count, unreads.read_count).

Every test checks them against the definition, counted the slow way from the messages: a
member's unread messages are the texts from others past their read pointer.
"""
import random
import threading
import time

import pytest
import sqlalchemy as sa
from flask_migrate import downgrade, upgrade
from sqlalchemy import and_, func, select

from tests.conftest import age, make_user
from webchat import create_app
from webchat.config import TestConfig
from webchat.extensions import db
from webchat.models import Conversation, Membership, Message, Unread, User, utcnow
from webchat.services import NotFound, accounts
from webchat.services import conversations as convs
from webchat.services import messages as msgs
from webchat.services import retention
from webchat.services.retention import purge_expired_messages
from webchat.services import conversation_list as lists
from webchat.services import read_state as reads


def counted_the_slow_way() -> dict[tuple[int, int], int]:
    """(conversation id, user id) -> unread, counted from the messages themselves."""
    rows = db.session.execute(
        select(Unread.conversation_id, Unread.user_id, func.count(Message.id))
        .outerjoin(Message, and_(Message.conversation_id == Unread.conversation_id,
                                 Message.id > Unread.last_read_message_id, Message.kind == "text",
                                 Message.sender_id != Unread.user_id))
        .group_by(Unread.conversation_id, Unread.user_id)
    ).all()
    return {(cid, uid): n for cid, uid, n in rows}


def assert_counters_exact() -> None:
    db.session.expire_all()
    expected = counted_the_slow_way()
    assert expected, "no members to check"
    by_user: dict[int, dict[int, int]] = {}
    for (cid, uid), n in expected.items():
        if n:
            by_user.setdefault(uid, {})[cid] = n
    for uid in {uid for _, uid in expected}:
        assert reads.unread_counts(uid) == by_user.get(uid, {}), f"user {uid}"
        # The list's rows read the same counters in their own query.
        shown = {row.id: row.unread for row in lists.conversation_list(uid)}
        assert shown == {cid: by_user.get(uid, {}).get(cid, 0) for cid in shown}, f"list of {uid}"
    for cid in {cid for cid, _ in expected}:
        states = reads.member_states(cid)
        assert {uid: s.unread for uid, s in states.items()} == {
            uid: n for (c, uid), n in expected.items() if c == cid}, f"conversation {cid}"
        rows = lists.rows_for_members(cid, list(states))
        assert {uid: row.unread for uid, row in rows.items() if row is not None} == {
            uid: n for (c, uid), n in expected.items() if c == cid and rows.get(uid) is not None}
    db.session.rollback()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counters_match_the_definition_through_every_kind_of_change(app, ctx, seed):
    """Sends, reads, new members, leaving, retention and account deletion, in a random order."""
    rnd = random.Random(seed)
    people = [make_user(f"user{i}") for i in range(8)]
    group = convs.create_group(people[0], "G", [p.id for p in people[1:6]])
    directs = [convs.find_or_create_direct(people[i], people[i + 1]) for i in range(0, 7, 2)]
    conversations = [group, *directs]

    def members(conversation):
        return [db.session.get(User, uid) for uid in db.session.scalars(
            select(Membership.user_id).where(Membership.conversation_id == conversation.id))]

    for step in range(120):
        conversation = db.session.get(Conversation, rnd.choice(conversations).id)
        if conversation is None:  # deleted with an account
            continue
        present = members(conversation)
        op = rnd.random()
        if op < 0.6 and present:
            msgs.send_message(rnd.choice(present), conversation, f"m{step}")
        elif op < 0.75 and present:
            reads.mark_read(rnd.choice(present).id, conversation)
        elif op < 0.8 and conversation.is_group:
            outside = [p for p in people if p.id not in {m.id for m in present}
                       and db.session.get(User, p.id) is not None]
            if outside:
                convs.add_members(present[0] if present[0].id == conversation.owner_id
                                  else db.session.get(User, conversation.owner_id), conversation,
                                  [rnd.choice(outside).id])
        elif op < 0.85 and conversation.is_group and len(present) > 3:
            leaver = rnd.choice([m for m in present if m.id != conversation.owner_id])
            convs.leave(leaver, conversation)
        elif op < 0.95:
            ids = db.session.scalars(select(Message.id).order_by(Message.id)).all()
            if ids:
                age(ids[: rnd.randint(1, max(1, len(ids) // 3))], 8)
                purge_expired_messages(7)
        elif step > 60:
            victim = rnd.choice([p for p in people[1:] if db.session.get(User, p.id) is not None])
            accounts.delete_user(db.session.get(User, victim.id))
            db.session.commit()
        if step % 10 == 0:
            assert_counters_exact()
    assert_counters_exact()
    assert sum(counted_the_slow_way().values()) > 0, "nothing was left unread: the check proves little"


def test_unread_stays_exact_past_a_large_backlog(app, ctx):
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    group = convs.create_group(alice, "G", [bob.id, carol.id])
    for i in range(300):
        msgs.send_message(carol if i % 3 == 2 else alice, group, f"m{i}")
    assert reads.unread_counts(bob.id) == {group.id: 300}
    assert reads.member_states(group.id)[alice.id].unread == 1  # carol's after alice's last
    assert_counters_exact()


def test_a_message_that_commits_behind_a_read_pointer_is_counted_as_read(app, ctx):
    """Two senders race: the message with the larger id commits first and bob reads it; the
    other then commits behind bob's pointer, so it is not unread for him (as if counted)."""
    if db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite gives ids in commit order: a message cannot commit behind another")
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    group = convs.create_group(alice, "G", [bob.id, carol.id])
    msgs.send_message(alice, group, "first")
    newest = db.session.scalar(select(func.max(Message.id)))
    db.session.execute(sa.text("SELECT setval('messages_id_seq', :v)"), {"v": newest + 100})
    winner, _ = msgs.send_message(alice, group, "committed first")
    reads.mark_read(bob.id, db.session.get(Conversation, group.id))
    db.session.execute(sa.text("SELECT setval('messages_id_seq', :v)"), {"v": newest})
    late, _ = msgs.send_message(carol, group, "committed late")
    assert late.id < winner.id
    db.session.expire_all()
    assert db.session.get(Conversation, group.id).last_message_id == winner.id
    assert reads.unread_counts(bob.id) == {}
    assert reads.unread_counts(carol.id) == {group.id: 1}  # alice's, after carol's own
    assert_counters_exact()
    db.session.execute(sa.text("SELECT setval('messages_id_seq', :v)"), {"v": winner.id})
    db.session.commit()


def test_migration_fills_the_counters_from_existing_messages(app, tmp_path):
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    if not url.startswith("sqlite"):
        pytest.skip("the migration's SQL is the same on both; one backend is enough here")
    config = TestConfig()
    config.SQLALCHEMY_DATABASE_URI = f"sqlite:///{tmp_path}/counters.db"
    other = create_app(config)
    with other.app_context():
        upgrade(revision="25332d6c0752")
        run = db.session.execute
        run(sa.text("INSERT INTO users (id, username, name, password_hash, remark, is_admin, is_disabled, created_at,"
                    " updated_at) VALUES (1, 'a', 'A', 'x', '', 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP),"
                    " (2, 'b', 'B', 'x', '', 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        run(sa.text("INSERT INTO conversations (id, is_group, last_message_text, last_message_image, created_at)"
                    " VALUES (1, 0, '', 0, CURRENT_TIMESTAMP)"))
        run(sa.text("INSERT INTO memberships (conversation_id, user_id, role, joined_at) VALUES"
                    " (1, 1, 'member', CURRENT_TIMESTAMP), (1, 2, 'member', CURRENT_TIMESTAMP)"))
        for i in range(1, 8):  # texts 1..6 from a, then a system line
            run(sa.text("INSERT INTO messages (id, conversation_id, sender_id, kind, body, created_at) VALUES"
                        " (:i, 1, 1, :kind, 'x', CURRENT_TIMESTAMP)"), {"i": i, "kind": "text" if i < 7 else "system"})
        run(sa.text("INSERT INTO unreads (conversation_id, user_id, last_read_message_id) VALUES (1, 1, 6), (1, 2, 2)"))
        db.session.commit()
        upgrade()
        assert run(sa.text("SELECT text_count FROM conversations")).scalar() == 6
        assert dict(run(sa.text("SELECT user_id, read_count FROM unreads")).all()) == {1: 6, 2: 2}
        assert reads.unread_counts(2) == {1: 4} and reads.unread_counts(1) == {}
        db.session.commit()
        downgrade(revision="25332d6c0752")  # and back: the rows that refer to conversations stay
        assert [run(sa.text(f"SELECT count(*) FROM {table}")).scalar() for table in
                ("conversations", "memberships", "unreads", "messages")] == [1, 2, 2, 7]
        db.session.remove()
        db.engine.dispose()


def test_recount_repairs_counters_of_rows_written_around_the_services(app, ctx):
    alice, bob = make_user("alice"), make_user("bob")
    direct = convs.find_or_create_direct(alice, bob)
    other = convs.find_or_create_direct(alice, make_user("carol"))
    msgs.send_message(alice, direct, "one")
    db.session.execute(sa.insert(Message).values(
        [{"conversation_id": direct.id, "sender_id": alice.id, "kind": "text", "body": f"bulk {i}",
          "created_at": utcnow()} for i in range(5)]))
    db.session.commit()
    assert reads.unread_counts(bob.id) == {direct.id: 1}  # the bulk rows are not counted yet
    reads.recount_unread([other.id])
    assert reads.unread_counts(bob.id) == {direct.id: 1}  # only the conversations asked for
    reads.recount_unread([direct.id])
    db.session.commit()
    assert reads.unread_counts(bob.id) == {direct.id: 6}
    assert_counters_exact()


# Races on PostgreSQL (SQLite runs one writer at a time). Each holds one transaction open at the
# point where another used to slip in, then checks the counters against the messages.

def _in_thread(app, name, work):
    """Run work() in its own app context (and database session) on a thread; return the thread."""
    failures = []

    def run():
        with app.app_context():
            try:
                work()
            except Exception as exc:  # pragma: no cover - the test reports it
                failures.append(exc)
            finally:
                db.session.remove()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.failures = failures
    thread.start()
    return thread


def _pause(monkeypatch, module, name, thread_name):
    """Make module.name stop in thread `thread_name` until released; return (paused, release)."""
    paused, release, real = threading.Event(), threading.Event(), getattr(module, name)

    def held(*args, **kwargs):
        if threading.current_thread().name == thread_name:
            paused.set()
            release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    return paused, release


def _read_while_held(app, holder, release, read) -> bool:
    """Start `read` while thread `holder` is held; release it; return whether the read waited for it."""
    reader = _in_thread(app, "read", read)
    reader.join(0.5)
    waited = reader.is_alive()
    release.set()
    holder.join(10)
    reader.join(10)
    assert not holder.failures and not reader.failures
    return waited


def _until_a_lock_wait(conn) -> None:
    """Return once a session of this database waits for a lock (or after 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'")).scalar():
        time.sleep(0.05)


def _hold_like_a_send(app, gid, sender_id, first_step, name, work, undo=None) -> threading.Thread:
    """Take a conversation's row as a send does (`first_step`), start `work` on a thread and let it
    reach a lock this holds, then take the sender's unread row as a send does next, and commit.
    Returns the finished thread: work that took those two locks in the other order deadlocked."""
    engine = sa.create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    try:
        with engine.connect() as send:
            send.execute(sa.text(first_step), {"g": gid})
            other = _in_thread(app, name, work)
            _until_a_lock_wait(send)
            send.execute(sa.text("UPDATE unreads SET read_count = read_count WHERE conversation_id = :g"
                                 " AND user_id = :u"), {"g": gid, "u": sender_id})
            if undo:
                send.execute(sa.text(undo), {"g": gid})
            send.commit()
        other.join(10)
    finally:
        engine.dispose()
    return other


@pytest.fixture
def pg_group(app, ctx):
    if db.engine.dialect.name != "postgresql":
        pytest.skip("a race between PostgreSQL transactions")
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    group = convs.create_group(alice, "G", [bob.id, carol.id])
    return alice.id, bob.id, carol.id, group.id


def test_a_read_waits_for_a_send_in_flight_and_counts_its_message(app, pg_group, monkeypatch):
    alice_id, bob_id, carol_id, gid = pg_group
    msgs.send_message(db.session.get(User, alice_id), db.session.get(Conversation, gid), "first")
    newest = db.session.scalar(select(func.max(Message.id)))
    db.session.execute(sa.text("SELECT setval('messages_id_seq', :v)"), {"v": newest + 100})
    winner, _ = msgs.send_message(db.session.get(User, alice_id), db.session.get(Conversation, gid), "first in")
    db.session.execute(sa.text("SELECT setval('messages_id_seq', :v)"), {"v": newest})
    db.session.commit()
    # carol's message (a smaller id) is written and held before its commit...
    paused, release = _pause(monkeypatch, msgs, "_message_sent", "late-send")
    late = _in_thread(app, "late-send", lambda: msgs.send_message(
        db.session.get(User, carol_id), db.session.get(Conversation, gid), "committed late"))
    assert paused.wait(10)
    # ...when bob reads up to alice's newer one (the hub does this for a viewer of the chat).
    waited = _read_while_held(app, late, release, lambda: reads.mark_read_for(gid, [bob_id], winner.id, notify=False))
    assert waited, "the read did not wait for the send in flight"
    assert reads.unread_counts(bob_id) == {}  # carol's message is behind his pointer: read
    assert_counters_exact()
    db.session.execute(sa.text("SELECT setval('messages_id_seq', :v)"), {"v": winner.id})
    db.session.commit()


def test_a_send_in_autocommit_behind_a_newer_message_recounts_and_refreshes_loaded_state(app, pg_group, monkeypatch):
    alice_id, bob_id, carol_id, gid = pg_group
    msgs.send_to(alice_id, gid, "first")
    newest = db.session.scalar(select(func.max(Message.id)))
    db.session.execute(sa.text("SELECT setval('messages_id_seq', :v)"), {"v": newest + 100})
    winner, _ = msgs.send_to(alice_id, gid, "first in")
    db.session.execute(sa.text("SELECT setval('messages_id_seq', :v)"), {"v": newest})
    reads.mark_read_for(gid, [bob_id], winner.id, notify=False)  # bob's pointer is past the late id
    db.session.commit()
    bob_state = db.session.get(Unread, (gid, bob_id))  # loaded in this session
    read_before = bob_state.read_count
    db.session.commit()  # nothing open: the send below is a transaction of its own
    autocommit, real = [], msgs.send_connection

    def spy():
        conn = real()
        autocommit.append(conn.connection.driver_connection.autocommit)
        return conn

    monkeypatch.setattr(msgs, "send_connection", spy)
    late, _ = msgs.send_to(carol_id, gid, "committed late")
    assert late.id < winner.id and autocommit == [True]
    # carol's message lies behind bob's pointer: he has read it, and his loaded state says so.
    assert bob_state.read_count == read_before + 1
    assert reads.unread_counts(bob_id) == {}
    assert_counters_exact()
    db.session.execute(sa.text("SELECT setval('messages_id_seq', :v)"), {"v": winner.id})
    db.session.commit()


def test_deleting_a_conversation_takes_its_locks_in_the_order_a_send_does(app, pg_group):
    """A send locks the conversation, then its sender's unread row; a delete must not hold that
    row while it waits for the conversation, or one of the two dies in a deadlock."""
    alice_id, bob_id, carol_id, gid = pg_group
    # The send's first step: webchat_send locks the conversation's row.
    deleter = _hold_like_a_send(app, gid, alice_id, "SELECT 1 FROM conversations WHERE id = :g FOR NO KEY UPDATE",
                                "delete", lambda: convs.delete_conversation(gid))
    assert not deleter.failures, deleter.failures
    db.session.expire_all()
    assert db.session.get(Conversation, gid) is None


def test_a_member_removed_while_their_send_waits_cannot_post(app, pg_group):
    alice_id, bob_id, carol_id, gid = pg_group
    engine = sa.create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    try:
        with engine.connect() as removal:
            # Removing carol, as remove_member does it: the conversation's row first, then her rows.
            removal.execute(sa.text("SELECT 1 FROM conversations WHERE id = :g FOR NO KEY UPDATE"), {"g": gid})
            for table in ("unreads", "memberships"):
                removal.execute(sa.text(f"DELETE FROM {table} WHERE conversation_id = :g AND user_id = :u"),
                                {"g": gid, "u": carol_id})
            sender = _in_thread(app, "send", lambda: msgs.send_to(carol_id, gid, "too late"))
            _until_a_lock_wait(removal)  # until her send waits for the conversation
            removal.commit()
        sender.join(10)
    finally:
        engine.dispose()
    assert [type(exc) for exc in sender.failures] == [NotFound]
    assert db.session.scalar(select(func.count()).select_from(Message).where(Message.body == "too late")) == 0
    assert_counters_exact()


def test_a_read_waits_for_a_retention_batch_in_flight(app, pg_group, monkeypatch):
    alice_id, bob_id, carol_id, gid = pg_group
    old, _ = msgs.send_message(db.session.get(User, alice_id), db.session.get(Conversation, gid), "old")
    msgs.send_message(db.session.get(User, alice_id), db.session.get(Conversation, gid), "new")
    age([old.id], 8)
    # The batch has deleted "old" and corrected the counters, and is held before its commit...
    paused, release = _pause(monkeypatch, retention, "refresh_last_message", "purge")
    purge = _in_thread(app, "purge", lambda: purge_expired_messages(7))
    assert paused.wait(10)
    # ...when bob reads the conversation: his count must not include "old" (it is gone).
    waited = _read_while_held(app, purge, release,
                              lambda: reads.mark_read(bob_id, db.session.get(Conversation, gid), notify=False))
    assert waited, "the read did not wait for the retention batch in flight"
    msgs.send_message(db.session.get(User, alice_id), db.session.get(Conversation, gid), "after")
    assert reads.unread_counts(bob_id) == {gid: 1}
    assert_counters_exact()


def test_a_retention_batch_takes_its_locks_in_the_order_a_send_does(app, pg_group):
    """A send locks the conversation, then its sender's unread row; the batch must not hold that
    row while it waits for the conversation, or one of the two dies in a deadlock."""
    alice_id, bob_id, carol_id, gid = pg_group
    old, _ = msgs.send_message(db.session.get(User, alice_id), db.session.get(Conversation, gid), "old")
    old_id = old.id
    age([old_id], 8)
    # The send holds the conversation's row (an update takes the lock webchat_send takes first).
    purge = _hold_like_a_send(app, gid, alice_id, "UPDATE conversations SET text_count = text_count + 1 WHERE id = :g",
                              "purge", lambda: purge_expired_messages(7),
                              undo="UPDATE conversations SET text_count = text_count - 1 WHERE id = :g")
    assert not purge.failures, purge.failures
    db.session.expire_all()
    assert db.session.get(Message, old_id) is None
    assert_counters_exact()


def test_creating_a_group_inserts_its_members_read_state_in_one_statement(app, ctx, count_queries):
    owner = make_user("owner")
    others = [make_user(f"member{i}").id for i in range(30)]
    counter = count_queries()
    with counter:
        group = convs.create_group(owner, "Big", others)
    inserts = [s for s in counter.statements if s.lstrip().upper().startswith("INSERT INTO UNREADS")]
    assert len(inserts) == 1, len(inserts)  # nothing to count in a new group: plain values, one executemany
    assert reads.member_states(group.id)[others[0]].unread == 0


def test_adding_members_to_a_group_with_history_inserts_them_in_one_statement(app, ctx, count_queries):
    owner = make_user("owner")
    group = convs.create_group(owner, "Big", [make_user("a").id, make_user("b").id])
    for i in range(3):
        msgs.send_message(owner, group, f"history {i}")
    newcomers = [make_user(f"new{i}").id for i in range(10)]
    counter = count_queries()
    with counter:
        convs.add_members(owner, group, newcomers)
    inserts = [s for s in counter.statements if s.lstrip().upper().startswith("INSERT INTO UNREADS")]
    recounts = [s for s in counter.statements if s.lstrip().upper().startswith("UPDATE UNREADS")]
    # plain values in one executemany, then one statement counts what they have read (the history)
    assert (len(inserts), len(recounts)) == (1, 1), counter.statements
    states = reads.member_states(group.id)
    assert [states[uid].unread for uid in newcomers] == [0] * len(newcomers)
    msgs.send_message(owner, group, "welcome")
    assert reads.member_states(group.id)[newcomers[0]].unread == 1
    assert_counters_exact()
