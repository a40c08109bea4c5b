"""A real gunicorn process against clients that flood, nest deeply, or close with frames still queued."""
import json
import re
import time

import pytest
import websocket

from tests.conftest import make_user
from tests.support import WebServer, flush, http_login
from tests.support import WsSocket as Socket
from webchat.extensions import db, redis_store
from webchat.models import Message
from webchat.presence import online_user_ids
from webchat.services import conversations as convs

pytestmark = pytest.mark.processes

TYPING_INTERVAL = 1.0


@pytest.fixture(scope="module")
def server(app):
    server = WebServer(app, config={"WS_TYPING_INTERVAL": TYPING_INTERVAL}).start()
    yield server
    server.stop()


@pytest.fixture
def chat(app):
    """alice and bob in a 1:1; mallory (the flooder) in a 1:1 with alice.

    On PostgreSQL ids restart with every test while the server lives on: only mallory floods and
    only bob types, so no test meets another's spent limits.
    """
    with app.test_request_context():
        alice, bob, mallory = make_user("alice"), make_user("bob"), make_user("mallory")
        direct = convs.find_or_create_direct(alice, bob)
        flooded = convs.find_or_create_direct(mallory, alice)
        return {"direct": direct.id, "flooded": flooded.id, "alice": alice.id, "bob": bob.id, "mallory": mallory.id}


def stored(app, cid: int) -> list[Message]:
    with app.app_context():
        rows = db.session.query(Message).filter_by(conversation_id=cid, kind="text").order_by(Message.id).all()
        db.session.remove()
        return rows


def wait_offline(app, user_id: int, timeout: float = 10) -> None:
    """Wait until the user's last socket handler has ended (it takes them offline as it finishes)."""
    deadline = time.monotonic() + timeout
    with app.app_context():
        while online_user_ids(redis_store.client, [user_id]):
            assert time.monotonic() < deadline, "the socket's handler did not end"
            time.sleep(0.05)


def watching(server, name: str, cid: int) -> Socket:
    """A socket of `name` with conversation `cid` open, ready."""
    sock = Socket(server, http_login(server.url, name))
    sock.send(type="join", conversation_id=cid)
    sock.ready()
    return sock


def test_a_typing_flood_gets_an_error_frame_then_1008_and_one_hint_goes_out(app, server, chat):
    alice = watching(server, "alice", chat["flooded"])
    mallory = Socket(server, http_login(server.url, "mallory"))
    mallory.ready()
    frame = json.dumps({"type": "typing", "conversation_id": chat["flooded"]})
    for _ in range(3000):  # on and on, as a flooder does, past the server's close
        try:
            mallory.ws.send(frame)
        except (websocket.WebSocketException, OSError):
            break
    # The server read and dropped the rest until we stopped: its frames were not lost to a reset.
    assert mallory.close_code() == 1008
    assert 'data-code="rate_limited"' in mallory.wait_for("ws-error", timeout=0)
    flush(app, alice, chat["alice"])  # every hint mallory's frames published has reached alice
    # One, or none when the server's inbox overflowed before the handler read the first frame.
    assert sum("Mallory is typing" in frame for frame in alice.frames) <= 1


def test_a_message_flood_is_refused_past_its_burst_then_closed(app, server, chat):
    mallory = Socket(server, http_login(server.url, "mallory"))
    mallory.ready()
    for i in range(200):
        try:
            mallory.send(type="message", conversation_id=chat["flooded"], body=f"{i} " + "x" * 3900,
                         client_id=f"flood-{i}")
        except (websocket.WebSocketException, OSError):
            break
    assert mallory.close_code() == 1008
    codes = re.findall(r'data-code="([^"]+)"', "".join(mallory.frames))
    assert codes and set(codes) == {"rate_limited"}
    # At most the burst (20) and what refilled meanwhile; none when the inbox overflowed first.
    assert len(stored(app, chat["flooded"])) <= 25


def test_messages_past_the_socket_and_user_limits_are_refused_and_the_socket_stays(app, chat):
    limits = {"WS_MESSAGE_RATE": 0.001, "WS_MESSAGE_BURST": 3, "WS_USER_MESSAGE_RATE": 0.001,
              "WS_USER_MESSAGE_BURST": 5}
    server = WebServer(app, config=limits).start()
    try:
        first, second = (Socket(server, http_login(server.url, "bob")) for _ in range(2))
        first.ready()
        second.ready()
        for i in range(4):
            first.send(type="message", conversation_id=chat["direct"], body=f"first {i}", client_id=f"f{i}")
        first.wait_for('data-code="rate_limited"')
        for i in range(3):
            second.send(type="message", conversation_id=chat["direct"], body=f"second {i}", client_id=f"s{i}")
        second.wait_for('data-code="rate_limited"')
        first.ready()
        second.ready()  # both sockets are still open and every frame was handled
        assert [m.body for m in stored(app, chat["direct"])] == [
            "first 0", "first 1", "first 2", "second 0", "second 1"]
    finally:
        server.stop()


def test_typing_hints_are_relayed_at_most_once_per_interval(app, server, chat):
    alice = watching(server, "alice", chat["direct"])
    bob = Socket(server, http_login(server.url, "bob"))
    for _ in range(5):
        bob.send(type="typing", conversation_id=chat["direct"])
    bob.ready()
    flush(app, alice, chat["alice"])
    assert sum("Bob is typing" in frame for frame in alice.frames) == 1
    alice.frames.clear()
    time.sleep(TYPING_INTERVAL)  # the interval itself is what is tested
    bob.send(type="typing", conversation_id=chat["direct"])
    alice.wait_for("Bob is typing")


@pytest.mark.parametrize("frame", ["[" * 30000, '{"type": "message", "x": ' + "[" * 5 + "]" * 5 + "}"])
def test_a_deeply_nested_frame_gets_an_error_frame_and_the_socket_stays(server, chat, frame):
    alice = Socket(server, http_login(server.url, "alice"))
    alice.ws.send(frame)
    assert 'data-code="too_deep"' in alice.wait_for("ws-error")
    alice.send(type="message", conversation_id=chat["direct"], body="still alive")
    alice.wait_for("still alive")


def test_frames_queued_when_the_client_closes_are_dropped(app, server, chat):
    bob = Socket(server, http_login(server.url, "bob"))
    bob.ready()
    # Ten messages and the closing frame in one write: the server reads them all before its
    # handler runs again, with the socket already closed.
    frames = b"".join(websocket.ABNF.create_frame(json.dumps(
        {"type": "message", "conversation_id": chat["direct"], "body": f"late {i}", "client_id": f"l{i}"}),
        websocket.ABNF.OPCODE_TEXT).format() for i in range(10))
    close = websocket.ABNF.create_frame((1000).to_bytes(2, "big"), websocket.ABNF.OPCODE_CLOSE).format()
    bob.ws.sock.sendall(frames + close)
    bob.ws.sock.settimeout(10)
    while bob.ws.sock.recv(65536):  # the server's closing frame, then the end of the connection
        pass
    wait_offline(app, chat["bob"])  # the handler is over: whatever it was going to store, it has
    assert stored(app, chat["direct"]) == []


def test_a_socket_whose_inbox_overflows_is_closed_as_a_flood(app, chat):
    """Frames that arrive faster than the handler reads them are not queued without end."""
    server = WebServer(app, config={"WS_INBOX_FRAMES": 4, "WS_FRAME_RATE": 1e6, "WS_FRAME_BURST": 1e6}).start()
    try:
        bob = Socket(server, http_login(server.url, "bob"))
        bob.ready()
        # Fifty frames in one write: the server's reader takes them all in before the handler runs.
        ping = websocket.ABNF.create_frame(json.dumps({"type": "ping"}), websocket.ABNF.OPCODE_TEXT).format()
        bob.ws.sock.sendall(ping * 50)
        assert bob.close_code() == 1008
        assert 'data-code="rate_limited"' in bob.wait_for("ws-error", timeout=0)
    finally:
        server.stop()
