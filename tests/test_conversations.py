"""Conversation and message services."""
import io
import re
import threading

import pytest
from sqlalchemy import func, select, text, update
from werkzeug.datastructures import FileStorage

from tests.conftest import image_bytes, make_user
from webchat.extensions import db
from webchat.models import Conversation, Image, Membership, Message, Unread, User, utcnow
from webchat.services import AccountClosed, DomainError, Forbidden, NotFound
from webchat.services import conversations as convs
from webchat.services import messages as msgs
from webchat.services import message_text
from webchat.services import history
from webchat.services import membership as access
from webchat.services import conversation_list as lists
from webchat.services import read_state as reads


@pytest.fixture
def people(app, ctx, users):
    return {name: db.session.get(User, uid) for name, uid in users.items()}


def upload(data=None, name="p.png"):
    return FileStorage(io.BytesIO(data if data is not None else image_bytes()), filename=name)


def count(model, *where):
    return db.session.scalar(select(func.count()).select_from(model).where(*where))


def test_direct_conversation_is_found_not_duplicated(people):
    a = convs.find_or_create_direct(people["alice"], people["bob"])
    b = convs.find_or_create_direct(people["bob"], people["alice"])
    assert a.id == b.id
    assert count(Conversation) == 1


def test_direct_with_yourself_is_refused(people):
    with pytest.raises(DomainError):
        convs.find_or_create_direct(people["alice"], people["alice"])


def test_concurrent_find_or_create_makes_one_conversation(app, users):
    results, errors = [], []
    barrier = threading.Barrier(4)

    def start(first, second):
        with app.app_context():
            try:
                a, b = db.session.get(User, users[first]), db.session.get(User, users[second])
                barrier.wait()
                results.append(convs.find_or_create_direct(a, b).id)
            except Exception as exc:  # pragma: no cover - the assertion below shows it
                errors.append(exc)
            finally:
                db.session.remove()

    threads = [threading.Thread(target=start, args=p) for p in
               [("alice", "bob"), ("bob", "alice"), ("alice", "bob"), ("bob", "alice")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    with app.app_context():
        assert count(Conversation) == 1


def test_create_group_with_system_line(people):
    group = convs.create_group(people["alice"], "Team", [people["bob"].id, people["carol"].id])
    assert group.is_group and group.owner_id == people["alice"].id
    assert count(Membership, Membership.conversation_id == group.id) == 3
    line = db.session.scalar(select(Message).where(Message.conversation_id == group.id))
    assert line.kind == "system" and message_text.system_text(line) == "Alice created the group “Team”"


@pytest.mark.parametrize("members, message", [([], "at least 2"), (["bob"], "at least 2")])
def test_group_needs_two_others(people, members, message):
    with pytest.raises(DomainError, match=message):
        convs.create_group(people["alice"], "T", [people[m].id for m in members])


def test_group_at_most_200_others(app, people):
    extra = [make_user(f"user{i:03d}").id for i in range(201)]
    with pytest.raises(DomainError, match="at most 200"):
        convs.create_group(people["alice"], "Big", extra)
    group = convs.create_group(people["alice"], "Big", extra[:200])
    assert count(Membership, Membership.conversation_id == group.id) == 201


def test_group_with_unknown_user_is_refused(people):
    with pytest.raises(DomainError, match="do not exist"):
        convs.create_group(people["alice"], "T", [people["bob"].id, 99999])
    assert count(Conversation) == 0


def test_group_name_is_checked(people):
    with pytest.raises(DomainError):
        convs.create_group(people["alice"], "   ", [people["bob"].id, people["carol"].id])


def test_add_and_remove_members_name_the_right_person(people):
    group = convs.create_group(people["alice"], "T", [people["bob"].id, people["carol"].id])
    convs.add_members(people["alice"], group, [people["dave"].id])
    convs.remove_member(people["alice"], group, people["bob"].id)
    lines = [message_text.system_text(m) for m in db.session.scalars(
        select(Message).where(Message.conversation_id == group.id).order_by(Message.id))]
    assert lines[1:] == ["Alice added Dave", "Alice removed Bob"]
    assert db.session.get(Membership, (group.id, people["bob"].id)) is None


def test_only_the_owner_manages_members(people):
    group = convs.create_group(people["alice"], "T", [people["bob"].id, people["carol"].id])
    with pytest.raises(Forbidden):
        convs.add_members(people["bob"], group, [people["dave"].id])
    with pytest.raises(Forbidden):
        convs.remove_member(people["bob"], group, people["carol"].id)
    with pytest.raises(Forbidden):
        convs.disband(people["bob"], group)
    with pytest.raises(Forbidden):
        convs.update_group(people["bob"], group, name="Mine")


def test_adding_unknown_or_existing_members_is_refused(people):
    group = convs.create_group(people["alice"], "T", [people["bob"].id, people["carol"].id])
    with pytest.raises(DomainError):
        convs.add_members(people["alice"], group, [424242])
    with pytest.raises(DomainError, match="already"):
        convs.add_members(people["alice"], group, [people["bob"].id])


def test_leave_hands_ownership_to_longest_member(people):
    group = convs.create_group(people["alice"], "T", [people["bob"].id, people["carol"].id])
    convs.leave(people["alice"], group)
    db.session.refresh(group)
    assert group.owner_id == people["bob"].id
    last = db.session.scalar(select(Message).where(Message.conversation_id == group.id).order_by(Message.id.desc()))
    assert message_text.system_text(last) == "Alice left the group"


def test_rename_writes_a_system_line(people):
    group = convs.create_group(people["alice"], "T", [people["bob"].id, people["carol"].id])
    convs.update_group(people["alice"], group, name="New name")
    assert group.name == "New name"
    assert group.last_message_text == "Alice renamed the group to “New name”"


def test_disband_deletes_everything(people):
    group = convs.create_group(people["alice"], "T", [people["bob"].id, people["carol"].id], upload())
    msgs.send_message(people["bob"], group, "pic", upload())
    gid = group.id
    convs.disband(people["alice"], group)
    assert count(Conversation, Conversation.id == gid) == 0
    assert count(Message, Message.conversation_id == gid) == 0
    assert count(Membership, Membership.conversation_id == gid) == 0
    assert count(Unread, Unread.conversation_id == gid) == 0
    assert count(Image) == 0


def test_send_updates_last_message_and_writes_constant_rows(app, people, count_queries):
    extra = [make_user(f"m{i:03d}").id for i in range(60)]
    small = convs.create_group(people["alice"], "small", [people["bob"].id, people["carol"].id])
    big = convs.create_group(people["alice"], "big", extra)
    writes, sends = {}, {}
    for group in (small, big):
        counter = count_queries()
        with counter:
            message, created = msgs.send_message(people["alice"], group, "hello")
        writes[group.name] = [s for s in counter.statements if re.search(r"\b(INSERT|UPDATE|DELETE)\b", s.upper())]
        sends[group.name] = counter.statements
        assert created
        db.session.refresh(group)
        assert group.last_message_id == message.id and group.last_message_text == "hello"
        assert db.session.get(Unread, (group.id, people["alice"].id)).last_read_message_id == message.id
    # Same statements for 3 and 61 members: no per-member writes.
    if db.engine.dialect.name != "postgresql":
        assert len(writes["small"]) == len(writes["big"]) == 3  # the message, the conversation, the pointer
        return
    # PostgreSQL: the whole send is one statement, the call of webchat_send()...
    assert [len(sends[name]) for name in ("small", "big")] == [1, 1]
    assert all("webchat_send(" in sends[name][0] for name in ("small", "big"))
    # ...and the rows it writes, counted by PostgreSQL in an open transaction, are the same few.
    # (The backend's counts also hold earlier transactions' not yet reported: compare before/after.)
    counts = text("SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_user_tables")
    for group in (small, big):
        before = {name: (ins, upd, dele) for name, ins, upd, dele in db.session.execute(counts)}
        db.session.execute(msgs.SEND_CALL, {  # in the transaction the query above opened
            "p_conversation_id": group.id, "p_sender_id": people["alice"].id, "p_body": "hi", "p_image_id": None,
            "p_client_id": None, "p_created_at": utcnow(), "p_text": "hi", "p_image_only": False})
        after = {name: (ins, upd, dele) for name, ins, upd, dele in db.session.execute(counts)}
        db.session.rollback()
        written = {name: tuple(a - b for a, b in zip(after[name], before[name])) for name in after}
        assert {name: n for name, n in written.items() if any(n)} == {
            "messages": (1, 0, 0), "conversations": (0, 1, 0), "unreads": (0, 1, 0)}, group.name


def test_a_send_outside_a_transaction_is_its_own_and_leaves_the_session_transactional(app, people, monkeypatch):
    if db.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL sends through webchat_send(); SQLite writes in the session's transaction")
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    bob_id = people["bob"].id
    db.session.commit()
    autocommit, drivers, real = [], [], msgs.send_connection

    def spy():
        conn = real()
        drivers.append(conn.connection.driver_connection)
        autocommit.append(drivers[-1].autocommit)  # psycopg's own flag
        return conn

    monkeypatch.setattr(msgs, "send_connection", spy)
    message, created = msgs.send_to(people["alice"].id, direct.id, "on its own")
    assert created and autocommit == [True]  # the call was its own transaction
    assert drivers[0].autocommit is False  # the connection went back to the pool as it came
    # And the session's next write can be rolled back.
    db.session.execute(update(User).where(User.id == bob_id).values(name="Changed"))
    db.session.rollback()
    assert db.session.scalar(select(User.name).where(User.id == bob_id)) == "Bob"
    assert reads.unread_counts(bob_id) == {direct.id: 1}
    # With an image, the image's row comes first: the function runs in that transaction.
    msgs.send_to(people["alice"].id, direct.id, "with a picture", upload())
    assert autocommit[1] is False
    assert reads.unread_counts(bob_id) == {direct.id: 2}


def test_unread_counts_are_exact_and_uncapped(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    for i in range(150):
        msgs.send_message(people["alice"], direct, f"m{i}")
    assert reads.unread_counts(people["bob"].id) == {direct.id: 150}
    assert reads.unread_counts(people["alice"].id) == {}  # never unread of your own
    reads.mark_read(people["bob"].id, direct)
    assert reads.unread_counts(people["bob"].id) == {}


def test_system_lines_are_not_unread(people):
    group = convs.create_group(people["alice"], "T", [people["bob"].id, people["carol"].id])
    assert reads.unread_counts(people["bob"].id) == {}
    msgs.send_message(people["alice"], group, "hi")
    assert reads.unread_counts(people["bob"].id) == {group.id: 1}


def test_hidden_conversation_returns_on_new_message_with_unread(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    msgs.send_message(people["alice"], direct, "one")
    membership = db.session.get(Membership, (direct.id, people["bob"].id))
    convs.hide(people["bob"], direct, membership)
    assert [r.id for r in lists.conversation_list(people["bob"].id)] == []
    assert [r.id for r in lists.conversation_list(people["alice"].id)] == [direct.id]  # only for bob
    msgs.send_message(people["alice"], direct, "two")
    rows = lists.conversation_list(people["bob"].id)
    assert [(r.id, r.unread) for r in rows] == [(direct.id, 2)]


def test_starting_a_hidden_conversation_again_brings_it_back(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    msgs.send_message(people["alice"], direct, "one")
    convs.hide(people["bob"], direct, db.session.get(Membership, (direct.id, people["bob"].id)))
    assert lists.conversation_list(people["bob"].id) == []
    assert convs.start_direct(people["bob"], username="alice").id == direct.id
    assert [r.id for r in lists.conversation_list(people["bob"].id)] == [direct.id]
    # Only for the one who starts it: alice hid nothing, and starting it again changes nothing.
    assert convs.start_direct(people["alice"], user_id=people["bob"].id).id == direct.id
    assert [r.id for r in lists.conversation_list(people["alice"].id)] == [direct.id]


@pytest.mark.parametrize("body, image, message", [
    ("", None, "Write something"), ("   \n ", None, "Write something"), ("x" * 4001, None, "at most 4000"),
])
def test_bad_messages_are_refused(people, body, image, message):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    with pytest.raises(DomainError, match=message):
        msgs.send_message(people["alice"], direct, body, image)
    assert count(Message) == 0


def test_image_only_message_previews_as_image(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    message, _ = msgs.send_message(people["alice"], direct, "", upload())
    db.session.refresh(direct)
    assert message.image_id and direct.last_message_image and direct.last_message_text == ""


def test_non_image_attachment_is_refused(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    with pytest.raises(DomainError):
        msgs.send_message(people["alice"], direct, "x", upload(b"<?php evil ?>", "x.png"))
    assert count(Message) == 0 and count(Image) == 0


def test_repeated_client_id_returns_the_first_message(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    first, created1 = msgs.send_message(people["alice"], direct, "once", client_id="abc")
    again, created2 = msgs.send_message(people["alice"], direct, "once", client_id="abc")
    assert (created1, created2) == (True, False) and first.id == again.id
    other, created3 = msgs.send_message(people["bob"], direct, "once", client_id="abc")
    assert created3 and other.id != first.id
    assert count(Message) == 2


def test_long_client_id_is_refused(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    with pytest.raises(DomainError):
        msgs.send_message(people["alice"], direct, "x", client_id="c" * 65)


def test_messages_page_keyset(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    ids = [msgs.send_message(people["alice"], direct, f"m{i}")[0].id for i in range(120)]
    newest = history.messages_page(direct.id)
    assert [m.id for m in newest] == ids[-50:]
    older = history.messages_page(direct.id, before=newest[0].id)
    assert [m.id for m in older] == ids[-100:-50]
    oldest = history.messages_page(direct.id, before=older[0].id)
    assert [m.id for m in oldest] == ids[:20]


def test_before_must_belong_to_the_conversation(people):
    one = convs.find_or_create_direct(people["alice"], people["bob"])
    two = convs.find_or_create_direct(people["alice"], people["carol"])
    foreign = msgs.send_message(people["alice"], two, "x")[0]
    with pytest.raises(NotFound):
        history.messages_page(one.id, before=foreign.id)
    with pytest.raises(DomainError):
        history.messages_page(one.id, before="abc")


def test_get_conversation_for_non_member_is_not_found(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    with pytest.raises(NotFound):
        access.get_conversation_for(people["carol"].id, direct.id)
    with pytest.raises(NotFound):
        access.get_conversation_for(people["carol"].id, 987654)


def test_list_is_newest_first_and_names_the_other_person(people):
    one = convs.find_or_create_direct(people["alice"], people["bob"])
    group = convs.create_group(people["carol"], "G", [people["alice"].id, people["dave"].id])
    msgs.send_message(people["alice"], one, "later")
    rows = lists.conversation_list(people["alice"].id)
    assert [r.id for r in rows] == [one.id, group.id]
    assert rows[0].title == "Bob" and rows[1].title == "G"


def test_replay_returns_newer_messages_and_late_committers(people):
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    ids = [msgs.send_message(people["alice"], direct, f"m{i}")[0].id for i in range(5)]
    replay = [m.id for m in history.messages_for_replay(people["bob"].id, ids[2])]
    # Everything newer, plus the recent ones just before: a message can commit after a newer id.
    assert ids[3] in replay and ids[4] in replay
    assert replay == sorted(replay)
    assert not history.messages_for_replay(people["carol"].id, 0)


def test_rows_for_members_match_single_rows_in_constant_queries(app, people, count_queries):
    extra = [make_user(f"r{i:03d}").id for i in range(40)]
    group = convs.create_group(people["alice"], "G", [people["bob"].id, people["carol"].id] + extra)
    for i in range(3):
        msgs.send_message(people["alice"], group, f"m{i}")
    reads.mark_read(people["bob"].id, group)
    msgs.send_message(people["carol"], group, "from carol")
    small_ids = [people["alice"].id, people["bob"].id, people["carol"].id, people["dave"].id]
    rows = lists.rows_for_members(group.id, small_ids)
    assert people["dave"].id not in rows  # not a member
    for uid in small_ids[:3]:
        single = lists.conversation_row(uid, group.id)
        assert (rows[uid].title, rows[uid].unread) == (single.title, single.unread)
    # carol's own send moved her pointer past what she had not read: sending reads the conversation
    assert [rows[u].unread for u in small_ids[:3]] == [1, 1, 0]
    counts = []
    for ids in (small_ids, small_ids + extra):
        counter = count_queries()
        with counter:
            lists.rows_for_members(group.id, ids)
        counts.append(counter.count)
    assert counts[0] == counts[1]
    direct = convs.find_or_create_direct(people["alice"], people["bob"])
    msgs.send_message(people["alice"], direct, "hi")
    pair = lists.rows_for_members(direct.id, [people["alice"].id, people["bob"].id])
    assert (pair[people["alice"].id].title, pair[people["bob"].id].title) == ("Bob", "Alice")
    assert (pair[people["alice"].id].unread, pair[people["bob"].id].unread) == (0, 1)


def test_list_pages_follow_each_other_without_overlap(people):
    alice = people["alice"]
    others = [make_user(f"p{i:03d}") for i in range(lists.LIST_PAGE * 2 + 7)]
    for other in others:
        msgs.send_message(other, convs.find_or_create_direct(alice, other), "hi")
    everything = [r.id for r in lists.conversation_list(alice.id)]
    assert len(everything) == len(others)
    first, cursor = lists.conversation_page(alice.id)
    second, cursor2 = lists.conversation_page(alice.id, cursor)
    third, cursor3 = lists.conversation_page(alice.id, cursor2)
    assert (len(first), len(second), len(third), cursor3) == (lists.LIST_PAGE, lists.LIST_PAGE, 7, None)
    assert [r.id for r in first + second + third] == everything
    # A conversation further down gets a message while the user scrolls: it moves to the top,
    # so the next page does not show it a second time and nothing else is skipped.
    mover = third[0].conversation
    msgs.send_message(others[[o.id for o in others].index(third[0].peer.id)], mover, "back on top")
    assert [r.id for r in lists.conversation_page(alice.id, cursor2)[0]] == [r.id for r in third[1:]]
    assert lists.conversation_page(alice.id)[0][0].id == mover.id


@pytest.mark.parametrize("before", ["", "x", "12-", "-3", "1-0", "99999999999999999999-1", "1-99999999999"])
def test_bad_list_cursor_is_refused(people, before):
    with pytest.raises(DomainError):
        lists.conversation_page(people["alice"].id, before)


def test_member_states_are_one_query_with_exact_unread_and_hiding(app, people, count_queries):
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    group = convs.create_group(alice, "G", [bob.id, carol.id])
    for i in range(3):
        msgs.send_message(alice, group, f"m{i}")
    convs.hide(carol, group, db.session.get(Membership, (group.id, carol.id)))
    counter = count_queries()
    with counter:
        states = reads.member_states(group.id)
    assert counter.count == 1
    hidden_through = group.last_message_id
    assert {uid: (s.hidden_through, s.unread) for uid, s in states.items()} == {
        alice.id: (None, 0), bob.id: (None, 3), carol.id: (hidden_through, 3)}
    assert states[bob.id].name == bob.name and states[bob.id].avatar_id == bob.avatar_id


def _delete_and_count(app, count_queries, user):
    from webchat.services import accounts, transaction

    counter = count_queries()
    with counter, transaction():
        accounts.delete_user(user)
    return counter.count


def test_deleting_a_user_hands_on_their_groups_in_queries_that_do_not_grow_with_them(app, people, count_queries):
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    handed = convs.create_group(alice, "Handed on", [bob.id, carol.id])
    alone = convs.create_group(alice, "Alone", [bob.id, carol.id])
    convs.leave(bob, alone)
    convs.leave(carol, alone)
    theirs = convs.create_group(carol, "Theirs", [alice.id, bob.id])
    msgs.send_message(alice, theirs, "from alice")
    msgs.send_message(bob, theirs, "from bob")
    ids = (handed.id, alone.id, theirs.id)
    few = _delete_and_count(app, count_queries, alice)
    handed, alone, theirs = (db.session.get(Conversation, cid) for cid in ids)
    assert alone is None
    assert handed.owner_id == bob.id  # joined before carol
    assert db.session.get(Membership, (handed.id, bob.id)).role == "owner"
    assert theirs.owner_id == carol.id and theirs.last_message_text == "from bob"
    assert {m.user_id for m in theirs.memberships} == {bob.id, carol.id}
    # Someone in five times as many groups costs the same number of statements.
    many_user = make_user("many")
    for i in range(5):
        convs.create_group(many_user, f"G{i}", [bob.id, carol.id])
        convs.create_group(carol, f"H{i}", [many_user.id, bob.id])
    assert _delete_and_count(app, count_queries, db.session.get(User, many_user.id)) <= few


@pytest.mark.parametrize("with_image", [False, True])
def test_acting_by_id_tells_a_closed_account_from_a_non_member(people, with_image):
    alice, bob, dave = people["alice"], people["bob"], people["dave"]
    direct = convs.find_or_create_direct(alice, bob)
    image = upload() if with_image else None
    with pytest.raises(NotFound):  # an active user who is not a member
        msgs.send_to(dave.id, direct.id, "not mine", upload() if with_image else None)
    with pytest.raises(NotFound):
        access.get_active_membership(dave.id, direct.id)
    bob.is_disabled = True
    db.session.commit()
    with pytest.raises(AccountClosed):
        msgs.send_to(bob.id, direct.id, "after disabling", image)
    with pytest.raises(AccountClosed):
        access.get_active_membership(bob.id, direct.id)
    assert count(Message, Message.body.in_(["not mine", "after disabling"])) == 0
