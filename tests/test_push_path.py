"""The push path in one process: what a published message event costs a listener (no query), and what it sends."""
import io
import json
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import create_engine, text
from werkzeug.datastructures import FileStorage

import webchat
from webchat import events
from webchat.events import ConversationRead, ListsStale, decode
from tests.conftest import image_bytes, make_user
from tests.support import shown_badge
from webchat.extensions import db, redis_store
from webchat.models import Membership, User
from webchat.realtime.hub import Hub
from webchat.realtime.transport import Client
from webchat.services import conversations as convs
from webchat.services import messages as msgs
from webchat.services import history
from webchat.services import read_state as reads


class FakeSocket:
    """Stands in for the browser end of a socket (not for Redis or the database)."""

    def __init__(self):
        self.frames = []
        self.connected = True

    def send(self, data):
        self.frames.append(data)

    def close(self, **_kw):
        self.connected = False


def attach(hub, user_id, locale="en"):
    client = Client(FakeSocket(), user_id, None, locale)
    client.start_live()
    hub.clients[user_id].add(client)
    return client


def published(pubsub, timeout=5.0):
    """Return the first message event published on the real channel (other events are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = pubsub.get_message(timeout=0.2)
        if item and item["type"] == "message" and json.loads(item["data"]).get("type") == "message":
            return item["data"]
    raise AssertionError("no message event was published")


def listening(pubsub=None):
    """Subscribe to the real channel; return once Redis has confirmed the subscription."""
    pubsub = pubsub or redis_store.client.pubsub()
    pubsub.subscribe(redis_store.channel)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        item = pubsub.get_message(timeout=0.5)
        if item and item["type"] == "subscribe":
            return pubsub
    raise AssertionError("Redis did not confirm the subscription")


def sent(send):
    """Call send() and return its result and the message event it published on the real channel."""
    pubsub = listening()
    try:
        result = send()
        return result, published(pubsub)
    finally:
        pubsub.close()


def new_hub(app) -> Hub:
    """A hub of this app's own, as another process would have."""
    hub = Hub()
    hub.init_app(app)
    return hub


def deliver(hub, raw, count_queries) -> int:
    """Plan one event on this hub, send what it planned, and return the statements planning took."""
    counter = count_queries()
    with counter:
        actions = hub._plan_safely(decode(raw))
    for action in actions:
        action()
    return counter.count


@pytest.fixture
def direct(app, ctx):
    alice, bob, carol = make_user("alice", name="Alice"), make_user("bob", name="Bob"), make_user("carol")
    conversation = convs.find_or_create_direct(alice, bob)
    msgs.send_message(bob, conversation, "unread before")
    return {"alice": alice.id, "bob": bob.id, "carol": carol.id, "cid": conversation.id, "bob_user": bob,
            "conversation": conversation}


def test_a_message_event_is_pushed_without_a_query(app, direct, count_queries):
    (message, _created), raw = sent(lambda: msgs.send_message(direct["bob_user"], direct["conversation"],
                                                               "hello <b>there</b>"))
    event = decode(raw)
    assert (event.message.conversation_id, event.message.id, sorted(event.member_ids)) == (
        direct["cid"], message.id, sorted([direct["alice"], direct["bob"]]))

    elsewhere = new_hub(app)
    stranger = attach(elsewhere, direct["carol"])
    assert deliver(elsewhere, raw, count_queries) == 0 and stranger.ws.frames == []

    hub = new_hub(app)
    alice_tabs = [attach(hub, direct["alice"]), attach(hub, direct["alice"], "zh")]
    bob_tab = attach(hub, direct["bob"])
    assert deliver(hub, raw, count_queries) == 0
    cid, mid = direct["cid"], message.id
    for tab in alice_tabs + [bob_tab]:
        assert len(tab.ws.frames) == 1
        frame = tab.ws.frames[0]
        assert f'id="message-{mid}"' in frame and f"#messages-{cid}" in frame
        assert "hello &lt;b&gt;there&lt;/b&gt;" in frame and "<b>there" not in frame
        assert f'id="conversation-{cid}"' in frame and f'data-last-mid="{mid}"' in frame
    # Each side's row names the other person and carries its own exact badge.
    alice_frame, bob_frame = alice_tabs[0].ws.frames[0], bob_tab.ws.frames[0]
    assert 'class="conv-name">Bob</' in alice_frame  # the element may change, the name must not
    assert 'class="conv-name">Alice</' in bob_frame
    assert shown_badge(alice_frame, cid) == "2" and shown_badge(bob_frame, cid) == ""
    # The same message is not sent to a socket twice (a replay racing the live push).
    deliver(hub, raw, count_queries)
    assert len(alice_tabs[0].ws.frames) == 1


def test_a_group_message_gives_each_member_their_badge_in_their_own_language(app, ctx, count_queries):
    alice, bob, carol = make_user("alice", name="Alice"), make_user("bob", name="Bob"), make_user("carol")
    group = convs.create_group(alice, "Team", [bob.id, carol.id])
    msgs.send_message(alice, group, "before")
    reads.mark_read(carol.id, group)  # carol has read it, bob has not
    image = FileStorage(io.BytesIO(image_bytes()), filename="p.png")
    # An image alone: "[Image]" in the row.
    (message, _created), raw = sent(lambda: msgs.send_message(alice, group, "", image))
    hub = new_hub(app)
    bob_en, bob_zh, carol_zh = attach(hub, bob.id), attach(hub, bob.id, "zh"), attach(hub, carol.id, "zh")
    assert deliver(hub, raw, count_queries) == 0
    frames = {name: tab.ws.frames[0] for name, tab in
              (("bob_en", bob_en), ("bob_zh", bob_zh), ("carol_zh", carol_zh))}
    assert all(f'id="message-{message.id}"' in frame for frame in frames.values())
    assert "[Image]" in frames["bob_en"] and 'alt="Image"' in frames["bob_en"]
    for name in ("bob_zh", "carol_zh"):
        assert "[图片]" in frames[name] and 'alt="图片"' in frames[name] and "[Image]" not in frames[name]
    assert [shown_badge(frames[name], group.id) for name in ("bob_en", "bob_zh", "carol_zh")] == ["2", "2", "1"]


def test_a_hidden_conversation_comes_back_with_the_pushed_message(app, direct, count_queries):
    alice = db.session.get(User, direct["alice"])
    conversation = direct["conversation"]
    convs.hide(alice, conversation, db.session.get(Membership, (direct["cid"], direct["alice"])))
    _message, raw = sent(lambda: msgs.send_message(direct["bob_user"], conversation, "are you there?"))
    hub = new_hub(app)
    tab = attach(hub, direct["alice"])
    deliver(hub, raw, count_queries)
    assert f'id="conversation-{direct["cid"]}"' in tab.ws.frames[0]
    assert shown_badge(tab.ws.frames[0], direct["cid"]) == "2"


def test_an_idle_connection_the_database_dropped_is_replaced_on_checkout(app, monkeypatch):
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    if not url.startswith("postgresql"):
        pytest.skip("SQLite connections are files: nothing can drop them")
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("select pg_backend_pid()")).scalar()
        killer = create_engine(url)  # its own pool
        with killer.connect() as conn:
            conn.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
        killer.dispose()
        time.sleep(0.2)
        monkeypatch.setattr(webchat, "PING_AFTER_IDLE", 0.0)
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar() == 1
            assert conn.execute(text("select pg_backend_pid()")).scalar() != pid
    finally:
        engine.dispose()


def test_group_members_each_get_their_own_badge(app, ctx, count_queries):
    alice, bob, carol, dave = (make_user(n) for n in ("alice", "bob", "carol", "dave"))
    group = convs.create_group(alice, "Team", [bob.id, carol.id, dave.id])
    msgs.send_message(alice, group, "before carol reads")
    reads.mark_read(carol.id, group)
    (message, _created), raw = sent(lambda: msgs.send_message(alice, group, "to the team"))
    hub = new_hub(app)
    tabs = {u.id: [attach(hub, u.id), attach(hub, u.id)] for u in (alice, bob, carol)}  # dave is elsewhere
    assert deliver(hub, raw, count_queries) == 0
    badges = {}
    for uid, pair in tabs.items():
        assert [len(t.ws.frames) for t in pair] == [1, 1] and pair[0].ws.frames == pair[1].ws.frames
        assert f'id="message-{message.id}"' in pair[0].ws.frames[0]
        badges[uid] = shown_badge(pair[0].ws.frames[0], group.id)
    assert badges == {alice.id: "", bob.id: "2", carol.id: "1"}


def test_members_viewing_the_group_read_it_at_once_in_one_update(app, ctx, count_queries):
    alice, bob, carol, dave = (make_user(n) for n in ("alice", "bob", "carol", "dave"))
    group = convs.create_group(alice, "Team", [bob.id, carol.id, dave.id])
    pubsub = listening()
    message, _created = msgs.send_message(alice, group, "look at this")
    raw = published(pubsub)
    hub = new_hub(app)
    viewers = [attach(hub, bob.id), attach(hub, carol.id)]
    for client in viewers:
        client.joined = group.id
    elsewhere = attach(hub, dave.id)  # has the list open, not this conversation
    # one UPDATE for both viewers (not one per viewer); the states came in the event. On PostgreSQL
    # the conversation's lock is taken first (conversations.lock_conversations).
    assert deliver(hub, raw, count_queries) == (2 if db.engine.dialect.name == "postgresql" else 1)
    for client in viewers:
        assert shown_badge(client.ws.frames[0], group.id) == ""
    assert shown_badge(elsewhere.ws.frames[0], group.id) == "1"
    assert reads.unread_counts(bob.id) == {} and reads.unread_counts(dave.id) == {group.id: 1}
    # Each reader's other tabs hear of it: one read event per member whose pointer moved.
    readers = set()
    deadline = time.monotonic() + 5
    while len(readers) < 2 and time.monotonic() < deadline:
        item = pubsub.get_message(timeout=0.2)
        if item and item["type"] == "message":
            event = decode(item["data"])
            if isinstance(event, ConversationRead):
                readers.add(event.user_id)
    pubsub.close()
    assert readers == {bob.id, carol.id}


@pytest.mark.parametrize("locale", ["en", "zh"])
def test_a_live_frame_is_the_frame_replay_renders(app, ctx, count_queries, locale):
    """The push joins pieces rendered once around each member's badge: the frame replay renders whole."""
    alice, bob, carol = make_user("alice", name="Alice"), make_user("bob", name="Bob"), make_user("carol")
    group = convs.create_group(alice, "Team", [bob.id, carol.id])
    direct = convs.find_or_create_direct(alice, bob)
    msgs.send_message(alice, group, "before")
    reads.mark_read(carol.id, group)  # carol and bob have different counts
    for conversation in (group, direct):
        after = history.newest_message_id(bob.id)
        (message, _created), raw = sent(lambda: msgs.send_message(alice, conversation,
                                                                  "see https://example.com <i>now</i>"))
        hub = new_hub(app)
        live = {u.id: attach(hub, u.id, locale) for u in (alice, bob, carol)}
        deliver(hub, raw, count_queries)
        for user in (alice, bob, carol):
            if not live[user.id].ws.frames:
                assert user is carol and conversation is direct
                continue
            replayed = attach(Hub(), user.id, locale)
            hub.replay(replayed, after)
            assert replayed.ws.frames[-1] == live[user.id].ws.frames[0]


def test_apps_sharing_a_redis_server_on_other_databases_do_not_hear_each_other(app, ctx):
    from flask import Flask

    from webchat.extensions import RedisClient

    own = redis_store.client.connection_pool.connection_kwargs.get("db", 0)
    url, other = app.config["REDIS_URL"], (own + 1) % 16
    parts = urlsplit(url)
    other_url = (urlunsplit(parts._replace(path=f"/{other}")) if parts.scheme.startswith("redis")
                 else url.split("?")[0] + f"?db={other}")  # unix://<socket path>?db=N
    neighbour = Flask("neighbour")  # another site on the same Redis server, another database
    neighbour.config["REDIS_URL"] = other_url
    RedisClient().init_app(neighbour)
    with neighbour.app_context():
        theirs = listening(redis_store.client.pubsub())
    ours = listening()
    try:
        events.publish(ListsStale([]))
        assert published_types(ours) == ["refresh"]
        assert published_types(theirs) == []
    finally:
        ours.close()
        theirs.close()


def published_types(pubsub, seconds: float = 0.5) -> list[str]:
    types, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        item = pubsub.get_message(timeout=0.1)
        if item and item["type"] == "message":
            types.append(json.loads(item["data"])["type"])
    return types
