"""Events go out after their transaction commits, once its connection is back, and never after a rollback."""
import time

import pytest

from webchat import events
from webchat.events import ConversationRead, ListsStale, decode, emit
from webchat.extensions import db, redis_store


@pytest.fixture
def heard(app, ctx):
    """Subscribe to the real channel; return a function giving the events published since, up to a marker."""
    pubsub = redis_store.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(redis_store.channel)
    while pubsub.get_message(timeout=0.1) is None and not redis_store.client.pubsub_numsub(redis_store.channel)[0][1]:
        pass

    def until_marker():
        events.publish(ListsStale([-1]))  # published last: everything before it has arrived
        seen, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline:
            item = pubsub.get_message(timeout=0.2)
            if item and item["type"] == "message":
                event = decode(item["data"])
                if event == ListsStale([-1]):
                    return seen
                seen.append(event)
        raise AssertionError("the marker never arrived")

    yield until_marker
    pubsub.close()


def test_an_event_waits_for_the_commit(heard):
    db.session.execute(db.text("SELECT 1"))  # a transaction is open from here
    emit(ConversationRead(1, 1))
    assert db.session().in_transaction()
    db.session.commit()
    assert heard() == [ConversationRead(1, 1)]


def test_a_rolled_back_event_is_never_published(heard):
    db.session.execute(db.text("SELECT 1"))
    emit(ConversationRead(2, 2))
    db.session.rollback()
    db.session.execute(db.text("SELECT 1"))
    db.session.commit()  # a later commit of the same session publishes nothing of the rolled back one
    assert heard() == []


def test_outside_a_transaction_an_event_goes_at_once(heard):
    db.session.close()
    emit(ConversationRead(3, 3))
    assert heard() == [ConversationRead(3, 3)]


def test_the_connection_is_back_in_the_pool_before_the_publish(app, ctx, monkeypatch):
    """A publish is a network round trip: holding the database connection over it starved the pool."""
    held = []
    monkeypatch.setattr(events, "publish", lambda event: held.append(db.engine.pool.checkedout()))
    db.session.execute(db.text("SELECT 1"))
    emit(ConversationRead(4, 4))
    assert db.engine.pool.checkedout() == 1
    db.session.commit()
    assert held == [0]
