"""Retention: the purge service, the CLI, overlapping runs, and real rq cron + rq worker processes."""
import io
import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from werkzeug.datastructures import FileStorage

from tests.conftest import age, image_bytes, make_user
from tests.support import RedisServer, process_env, start_procfile_process, stop_group
from webchat import models
from webchat.extensions import db, redis_store
from webchat.models import Conversation, Image, Message, RetentionRun, utcnow
from webchat.services import conversations as convs
from webchat.services import messages as msgs
from webchat.services import read_state as reads
from webchat.services.retention import LOCK_NAME, purge_expired_messages


@pytest.fixture
def pair(app, ctx):
    alice, bob = make_user("alice"), make_user("bob")
    return alice, bob, convs.find_or_create_direct(alice, bob)


def count(model, *where):
    return db.session.scalar(select(func.count()).select_from(model).where(*where))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ages=st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), min_size=1, max_size=25),
       batch=st.integers(min_value=1, max_value=7))
def test_exactly_the_expired_messages_go(app, ctx, ages, batch):
    for model in (Message, Image, models.Unread, models.Membership, Conversation):
        db.session.execute(model.__table__.delete())
    db.session.commit()
    redis_store.client.delete(LOCK_NAME)
    alice = db.session.scalar(select(models.User).where(models.User.username == "alice")) or make_user("alice")
    bob = db.session.scalar(select(models.User).where(models.User.username == "bob")) or make_user("bob")
    direct = convs.find_or_create_direct(alice, bob)
    now = utcnow()
    for i, days in enumerate(ages):
        message, _ = msgs.send_message(alice, direct, f"m{i}")
        message.created_at = now - timedelta(days=days)
    db.session.commit()
    result = purge_expired_messages(7, batch_size=batch, trigger="test")
    remaining = {m.body for m in db.session.scalars(select(Message))}
    # A small margin either side of the cut-off: the clock moves during the run.
    expected_gone = {f"m{i}" for i, d in enumerate(ages) if d > 7 + 1e-3}
    expected_kept = {f"m{i}" for i, d in enumerate(ages) if d < 7 - 1e-3}
    assert not (remaining & expected_gone)
    assert expected_kept <= remaining
    assert result.messages == len(ages) - len(remaining)
    db.session.refresh(direct)
    newest = db.session.scalar(select(Message).order_by(Message.id.desc()).limit(1))
    assert direct.last_message_id == (newest.id if newest else None)
    assert direct.last_message_text == (newest.body if newest else "")


def test_images_go_with_their_messages_and_read_state_stays_consistent(pair):
    alice, bob, direct = pair
    old, _ = msgs.send_message(alice, direct, "old", FileStorage(io.BytesIO(image_bytes()), filename="a.png"))
    new, _ = msgs.send_message(alice, direct, "new", FileStorage(io.BytesIO(image_bytes()), filename="b.png"))
    age([old.id], 8)
    result = purge_expired_messages(7)
    assert (result.messages, result.images, result.conversations) == (1, 1, 1)
    assert count(Image) == 1 and db.session.get(Image, new.image_id) is not None
    assert reads.unread_counts(bob.id) == {direct.id: 1}  # the read pointer counts only what exists


def test_last_message_is_fixed_up_when_everything_expires(pair):
    alice, bob, direct = pair
    ids = [msgs.send_message(alice, direct, f"x{i}")[0].id for i in range(3)]
    age(ids, 30)
    purge_expired_messages(7, batch_size=2)
    db.session.refresh(direct)
    assert (direct.last_message_id, direct.last_message_text, direct.last_message_at) == (None, "", None)
    run = db.session.scalar(select(RetentionRun))
    assert (run.messages_deleted, run.batches) == (3, 2)


@pytest.mark.parametrize("conversations", [2, 6])
def test_fixing_up_last_messages_costs_the_same_for_any_number_of_conversations(
        pair, count_queries, conversations):
    alice, bob, direct = pair
    cids, kept = [direct.id], {}
    for i in range(conversations - 1):
        cids.append(convs.find_or_create_direct(alice, make_user(f"peer{i}")).id)
    for n, cid in enumerate(cids):
        conversation = db.session.get(Conversation, cid)
        old = msgs.send_message(alice, conversation, f"old {n}")[0]
        age([old.id], 30)
        if n % 2:  # every other conversation keeps a newer message
            kept[cid] = msgs.send_message(alice, conversation, f"kept {n}")[0]
    db.session.execute(db.delete(Message).where(Message.body.like("old %")))
    with count_queries() as counter:
        convs.refresh_last_message(cids)
    db.session.commit()
    assert counter.count == 3  # the newest ids, those messages, one UPDATE for all
    for cid in cids:
        row = db.session.execute(select(Conversation.last_message_id, Conversation.last_message_text)
                                 .where(Conversation.id == cid)).one()
        assert tuple(row) == ((kept[cid].id, kept[cid].body) if cid in kept else (None, ""))


def test_a_second_overlapping_run_returns_at_once(pair):
    alice, bob, direct = pair
    ids = [msgs.send_message(alice, direct, "old")[0].id]
    age(ids, 10)
    holder = redis_store.client.lock(LOCK_NAME, timeout=60)
    assert holder.acquire(blocking=False)
    try:
        assert purge_expired_messages(7) is None
        assert count(Message) == 1
    finally:
        holder.release()
    assert purge_expired_messages(7).messages == 1


def test_is_idempotent(pair):
    alice, bob, direct = pair
    age([msgs.send_message(alice, direct, "old")[0].id], 10)
    assert purge_expired_messages(7).messages == 1
    assert purge_expired_messages(7).messages == 0


@pytest.mark.parametrize("days", ["0", "-3"])
def test_cli_refuses_days_below_one(app, days):
    result = app.test_cli_runner().invoke(args=["purge-messages", "--days", days])
    assert result.exit_code != 0
    assert "must be 1 or more" in result.output


def test_cli_purges_and_prints_counts(app, pair):
    alice, bob, direct = pair
    age([msgs.send_message(alice, direct, "old")[0].id], 3)
    msgs.send_message(alice, direct, "fresh")
    result = app.test_cli_runner().invoke(args=["purge-messages", "--days", "2"])
    assert result.exit_code == 0, result.output
    assert "Deleted 1 messages" in result.output
    assert [m.body for m in db.session.scalars(select(Message))] == ["fresh"]


def test_chat_page_says_when_messages_disappear(app, pair):
    from tests.conftest import login_client

    page = login_client(app, "alice").get(f"/conversations/{pair[2].id}").get_data(as_text=True)
    assert "Messages disappear after 7 days." in page


# The clock's schedule in the process tests: every second. croniter, which rq cron uses, reads a
# sixth field as seconds, so the real `rq cron` process with webchat.jobs.cron fires within a
# second of starting, and the tests never wait for a minute boundary (they took two minutes
# each and could miss one).
EVERY_SECOND = "* * * * * *"


def wait_for_runs(condition, timeout: float) -> list[RetentionRun]:
    """Poll the retention runs until condition(runs) holds or `timeout` s pass; return the runs."""
    deadline = time.monotonic() + timeout
    while True:
        db.session.rollback()
        runs = list(db.session.scalars(select(RetentionRun).order_by(RetentionRun.id)))
        if condition(runs) or time.monotonic() >= deadline:
            return runs
        time.sleep(0.2)


def deleted(runs: list[RetentionRun]) -> int:
    return sum(r.messages_deleted for r in runs)


def start_clock_and_worker(app, tmp_path, **env):
    env = process_env(app, RETENTION_CRON=EVERY_SECOND, RQ_QUEUE="webchat-test", **env)
    with open(tmp_path / "rq.log", "wb") as log:  # the processes keep their own copy of it
        return [start_procfile_process(name, env, log) for name in ("worker", "clock")]


def rq_log(tmp_path) -> str:
    return (tmp_path / "rq.log").read_text(errors="replace")[-3000:]


@pytest.mark.processes
def test_procfile_clock_and_worker_purge_on_schedule(app, pair, tmp_path):
    alice, _bob, direct = pair
    age([msgs.send_message(alice, direct, "expired")[0].id], 9)
    msgs.send_message(alice, direct, "kept")
    processes = start_clock_and_worker(app, tmp_path)
    try:
        runs = wait_for_runs(deleted, 60)
        assert deleted(runs) == 1, rq_log(tmp_path)
        assert {r.trigger for r in runs} == {"cron"}
        assert [m.body for m in db.session.scalars(select(Message))] == ["kept"]
    finally:
        for process in processes:
            stop_group(process)


@pytest.mark.processes
def test_redis_down_at_schedule_time_then_the_next_tick_runs(app, pair, tmp_path):
    alice, _bob, direct = pair
    redis_server = RedisServer().start()
    processes = start_clock_and_worker(app, tmp_path, REDIS_URL=redis_server.url)
    try:
        # The schedule fires (nothing has expired yet), then Redis goes away.
        assert wait_for_runs(bool, 60), rq_log(tmp_path)
        redis_server.stop()
        time.sleep(1)  # a purge already running when Redis went finishes before anything expires
        age([msgs.send_message(alice, direct, "expired")[0].id], 9)
        # Several ticks find Redis down: the clock cannot enqueue, the worker cannot fetch.
        time.sleep(3)
        assert deleted(wait_for_runs(bool, 0)) == 0
        assert "in enqueue_jobs" in (tmp_path / "rq.log").read_text(errors="replace")  # a tick met the outage
        redis_server.start()
        assert deleted(wait_for_runs(deleted, 60)) == 1, rq_log(tmp_path)
    finally:
        for process in processes:
            stop_group(process)
        redis_server.stop()


def test_an_interrupted_run_leaves_whole_batches_and_the_next_run_finishes(app, pair, monkeypatch):
    alice, bob, direct = pair
    ids = [msgs.send_message(alice, direct, f"old{i}", FileStorage(io.BytesIO(image_bytes()), filename="p.png"))[0].id
           for i in range(5)]
    age(ids, 10)
    from webchat.services import retention as retention_module

    real = retention_module.refresh_last_message
    calls = []

    def crash_in_second_batch(conversation_ids):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("worker killed")  # not an Exception: like a kill mid-batch
        return real(conversation_ids)

    monkeypatch.setattr(retention_module, "refresh_last_message", crash_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        purge_expired_messages(7, batch_size=2)
    # The first batch is gone with its images; the second was rolled back whole.
    assert count(Message) == 3 and count(Image) == 3
    assert all(db.session.get(Image, m.image_id) for m in db.session.scalars(select(Message)))
    monkeypatch.setattr(retention_module, "refresh_last_message", real)
    assert purge_expired_messages(7, batch_size=2).messages == 3
    assert count(Message) == 0 and count(Image) == 0
