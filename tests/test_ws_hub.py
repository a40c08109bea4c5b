"""The hub's listener and presence, and the handshake's Origin allow-list."""
import time

import threading

import pytest
import redis
import websocket

from tests.conftest import make_user
from tests.support import RedisServer, WebServer, cookie_header, http_login
from tests.test_push_path import FakeSocket
from webchat.events import ListsStale, publish
from webchat.extensions import redis_store
from webchat.presence import online_user_ids
from webchat.realtime import routes
from webchat.realtime.hub import Hub
from webchat.realtime.transport import Client


@pytest.fixture
def fresh_hub(app, monkeypatch):
    """A hub as a freshly started web process has one (no listener yet), used by the /ws handler."""
    original = app.extensions.get("hub")
    hub = Hub()
    hub.init_app(app)
    monkeypatch.setattr(routes, "hub", hub)
    yield hub
    hub._stopping = True  # its threads end within a second (the heartbeat after its sleep)
    for client in hub.all_clients():
        hub.remove(client)
    app.extensions["hub"] = original


def test_a_socket_on_a_fresh_process_hears_what_is_published_once_it_has_caught_up(app, fresh_hub, monkeypatch):
    """The listener starts with the first socket; the handler's catch-up waits for its subscription."""
    subscribe = fresh_hub._subscribe
    monkeypatch.setattr(fresh_hub, "_subscribe", lambda pubsub: (time.sleep(0.5), subscribe(pubsub)))
    with app.test_request_context("/"):
        user = make_user("alice")
        client = Client(FakeSocket(), user.id, None, "en")
        fresh_hub.add(client)
        assert routes._catch_up(client, after=None)
        assert fresh_hub.subscribed.is_set()
        # Published the moment catch-up is over: without the wait, before the subscription existed.
        assert publish(ListsStale([user.id]))
    deadline = time.monotonic() + 5
    while not client.ws.frames and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.ws.frames and 'id="ws-refresh"' in client.ws.frames[0]


def test_the_listener_reports_its_subscription(app, fresh_hub):
    assert not fresh_hub.subscribed.is_set() and not fresh_hub.settled.is_set()
    assert fresh_hub.wait_until_live(5)
    assert fresh_hub.subscribed.is_set()
    with app.app_context():
        assert redis_store.client.pubsub_numsub(redis_store.channel)[0][1] >= 1


def test_a_dropped_subscription_is_followed_by_a_replay_to_every_socket(app, fresh_hub, monkeypatch):
    """What was published while the listener's connection was down reaches its sockets by replay."""
    private = RedisServer().start()  # CLIENT KILL below must not touch anyone else's connections
    try:
        monkeypatch.setitem(app.config, "REDIS_URL", private.url)
        resynced = threading.Event()
        resync = fresh_hub._resync
        monkeypatch.setattr(fresh_hub, "_resync", lambda: (resync(), resynced.set()))
        assert fresh_hub.wait_until_live(5)
        redis.Redis.from_url(private.url).client_kill_filter(_type="pubsub")
        assert resynced.wait(10), "the listener resubscribed without replaying"
        assert fresh_hub.subscribed.wait(5)
    finally:
        private.stop()


@pytest.mark.processes
def test_a_crashed_processs_users_go_offline_when_its_presence_expires(app):
    with app.app_context():
        bob = make_user("bob").id
    server = WebServer(app, config={"PRESENCE_TTL": 2, "PRESENCE_BEAT": 0.5}).start()
    try:
        client = http_login(server.url, "bob")
        ws = websocket.create_connection(server.url.replace("http", "ws") + "/ws", origin=server.url,
                                         header=[f"Cookie: {cookie_header(client)}"], timeout=10)
        with app.app_context():
            assert wait_until(lambda: online_user_ids(redis_store.client, [bob]) == {bob}, 5)
            server.kill()  # SIGKILL: nothing takes bob out of the process's set
            assert online_user_ids(redis_store.client, [bob]) == {bob}
            assert wait_until(lambda: not online_user_ids(redis_store.client, [bob]), 2 + 3)
        ws.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def allowing_server(app):
    server = WebServer(app, WS_ALLOWED_ORIGINS="https://chat.example.com,https://app.example.com").start()
    yield server
    server.stop()


@pytest.mark.processes
@pytest.mark.parametrize("origin, allowed", [
    ("https://chat.example.com", True), ("https://app.example.com", True), ("https://other.example.com", False),
    ("https://chat.example.com.evil.example", False), (None, True)])
def test_the_handshake_accepts_the_allowed_origins_and_its_own(app, allowing_server, origin, allowed):
    with app.app_context():
        make_user("alice")
    client = http_login(allowing_server.url, "alice")
    url = allowing_server.url.replace("http", "ws") + "/ws"
    headers = [f"Cookie: {cookie_header(client)}"]
    if allowed:
        websocket.create_connection(url, origin=origin or allowing_server.url, header=headers, timeout=10).close()
    else:
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(url, origin=origin, header=headers, timeout=10)
        assert info.value.status_code == 403


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
