"""Real-time delivery across two real gunicorn (gevent) processes on one database and Redis."""
import json
import os
import re
import signal
import time

import pytest
import websocket

from tests.conftest import make_user
from tests.support import RedisServer, WebServer, cookie_header, csrf_of, flush, http_login, send_http, shown_badge
from tests.support import WsSocket as Socket
from webchat.extensions import db
from webchat.models import Unread
from webchat.services import conversations as convs
from webchat.services import history
from webchat.services import read_state as reads

pytestmark = pytest.mark.processes


# Settings for a test that floods on purpose (config.py does not read these from the environment).
UNLIMITED = {"WS_FRAME_RATE": 1e6, "WS_FRAME_BURST": 1e6, "WS_MESSAGE_RATE": 1e6, "WS_MESSAGE_BURST": 1e6,
             "WS_USER_MESSAGE_RATE": 1e6, "WS_USER_MESSAGE_BURST": 1e6, "WS_INBOX_FRAMES": 100000,
             "WS_INBOX_CHARS": 10**9}
NO_TYPING_THROTTLE = {"WS_TYPING_INTERVAL": 0}


@pytest.fixture(scope="module")
def servers(app):
    # No typing throttle here (tests/test_ws_limits.py has its own): on PostgreSQL each test's
    # users get the ids of the last test's (TRUNCATE ... RESTART IDENTITY), and these processes
    # would still hold the last test's hints against them.
    first, second = WebServer(app, config=NO_TYPING_THROTTLE).start(), WebServer(app, config=NO_TYPING_THROTTLE).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def chat(app):
    """alice and bob with a 1:1, carol and dave in a group with them."""
    with app.test_request_context():
        people = {n: make_user(n) for n in ("alice", "bob", "carol", "dave")}
        direct = convs.find_or_create_direct(people["alice"], people["bob"])
        group = convs.create_group(people["alice"], "G", [people["bob"].id, people["carol"].id])
        return {"direct": direct.id, "group": group.id, **{n: u.id for n, u in people.items()}}


def test_message_reaches_every_socket_on_both_processes(app, servers, chat):
    a, b = servers
    alice_a, bob_a, bob_b, alice_b = (http_login(s.url, n) for s, n in
                                      [(a, "alice"), (a, "bob"), (b, "bob"), (b, "alice")])
    bob1, bob2, alice_tab = Socket(a, bob_a), Socket(b, bob_b), Socket(b, alice_b)
    for sock in (bob1, bob2, alice_tab):
        sock.ready()
    mid = send_http(alice_a, chat["direct"], "to every tab")
    for sock in (bob1, bob2, alice_tab):
        frame = sock.wait_for(f'id="message-{mid}"')
        assert f'hx-swap-oob="beforeend:#messages-{chat["direct"]}"' in frame
        assert f'id="conversation-{chat["direct"]}"' in frame and f'id="unread-{chat["direct"]}"' in frame
    assert shown_badge(bob2.wait_for(f"message-{mid}"), chat["direct"]) == "1"
    # The sender's own badge stays empty.
    assert shown_badge(alice_tab.wait_for(f"message-{mid}"), chat["direct"]) == ""
    # Carol is not in the 1:1: nothing for her.
    carol = Socket(b, http_login(b.url, "carol"))
    carol.ready()
    mid2 = send_http(alice_a, chat["direct"], "private")
    bob1.wait_for(f"message-{mid2}")
    flush(app, carol, chat["carol"])  # everything published before has reached her
    assert not any(f"message-{mid2}" in frame for frame in carol.frames)
    for sock in (bob1, bob2, alice_tab, carol):
        sock.close()


def test_group_message_reaches_members_on_both_processes(servers, chat):
    a, b = servers
    bob, carol = Socket(a, http_login(a.url, "bob")), Socket(b, http_login(b.url, "carol"))
    bob.ready()
    carol.ready()
    mid = send_http(http_login(b.url, "alice"), chat["group"], "hello group")
    bob.wait_for(f'id="message-{mid}"')
    carol.wait_for(f'id="message-{mid}"')
    bob.close()
    carol.close()


def test_websocket_message_frame_sends(app, servers, chat):
    a, b = servers
    alice = Socket(a, http_login(a.url, "alice"))
    bob = Socket(b, http_login(b.url, "bob"))
    alice.ready()
    bob.send(type="message", conversation_id=chat["direct"], body="over the socket", client_id="w1",
             HEADERS={"HX-Request": "true"})
    frame = alice.wait_for("over the socket")
    mid = int(re.search(r'id="message-(\d+)"', frame).group(1))
    bob.wait_for(f"message-{mid}")  # the sender's own socket gets it too
    bob.send(type="message", conversation_id=chat["direct"], body="over the socket", client_id="w1")
    bob.ready()  # the repeated frame has been handled
    with app.app_context():
        assert len(history.messages_page(chat["direct"])) == 1  # same client_id: no second message
    alice.close()
    bob.close()


@pytest.mark.parametrize("kind", ["message", "join", "typing"])
def test_a_disabled_accounts_frame_is_refused_and_its_socket_closed(app, servers, chat, kind):
    a, _b = servers
    bob = Socket(a, http_login(a.url, "bob"))
    bob.ready()
    with app.app_context():
        from webchat.models import User

        # Disabled behind the app's back: the event that would close the socket never comes.
        db.session.get(User, chat["bob"]).is_disabled = True
        db.session.commit()
    bob.send(type=kind, conversation_id=chat["direct"], body="after disabling", client_id="d1")
    assert bob.close_code(5) == 1008
    with app.app_context():
        assert history.messages_page(chat["direct"]) == []


def test_join_marks_arriving_messages_read(app, servers, chat):
    a, b = servers
    bob = Socket(b, http_login(b.url, "bob"))
    bob.send(type="join", conversation_id=chat["direct"])
    bob.ready()  # the join has been handled
    mid = send_http(http_login(a.url, "alice"), chat["direct"], "seen at once")
    frame = bob.wait_for(f"message-{mid}")
    assert shown_badge(frame, chat["direct"]) == ""
    with app.app_context():
        pointer = db.session.get(Unread, (chat["direct"], chat["bob"])).last_read_message_id
        assert pointer == mid
        assert reads.unread_counts(chat["bob"]) == {}
    bob.close()


def test_typing_is_relayed_to_others_viewing(servers, chat):
    a, b = servers
    alice = Socket(a, http_login(a.url, "alice"))
    bob = Socket(b, http_login(b.url, "bob"))
    alice.send(type="join", conversation_id=chat["direct"])
    bob.send(type="join", conversation_id=chat["direct"])
    alice.ready()
    bob.ready()
    bob.send(type="typing", conversation_id=chat["direct"])
    assert "Bob is typing" in alice.wait_for(f'id="typing-{chat["direct"]}"')
    alice.send(type="typing", conversation_id=chat["direct"])
    assert "Alice is typing" in bob.wait_for("Alice is typing")  # published after bob's own hint
    assert not any("Bob is typing" in frame for frame in bob.frames)
    alice.close()
    bob.close()


def test_bad_frames_get_error_frames_and_the_socket_stays(servers, chat):
    a, _b = servers
    dave = Socket(a, http_login(a.url, "dave"))
    dave.ws.send("{not json")
    assert 'data-code="bad_request"' in dave.wait_for("ws-error")
    dave.frames.clear()
    dave.send(type="nonsense")
    assert 'data-code="unknown_type"' in dave.wait_for("ws-error")
    dave.frames.clear()
    dave.send(type="message", conversation_id=chat["direct"], body="sneaky")  # not a member
    assert 'data-code="not_found"' in dave.wait_for("ws-error")
    dave.frames.clear()
    dave.send(type="join", conversation_id=chat["group"])
    assert 'data-code="not_found"' in dave.wait_for("ws-error")
    dave.frames.clear()
    dave.ws.send(json.dumps({"type": "message", "body": "x" * (70 * 1024)}))
    assert 'data-code="too_large"' in dave.wait_for("ws-error")
    dave.frames.clear()
    dave.send(type="ping")
    dave.ws.ping()
    dave.send(type="typing", conversation_id="abc")
    assert "ws-error" in dave.wait_for("ws-error")  # still open and answering
    dave.close()


def test_replay_after_a_gap_in_order_without_gaps(app, servers, chat):
    a, b = servers
    alice = http_login(a.url, "alice")
    first = send_http(alice, chat["direct"], "before")
    missed = [send_http(alice, chat["direct"], f"missed {i}") for i in range(5)]
    other = send_http(alice, chat["group"], "missed in group")
    bob = Socket(b, http_login(b.url, "bob"), after=first)
    bob.wait_for(f"message-{other}")
    bob.ready()  # the replay is over: everything it sent has been read
    got = [int(m) for f in bob.frames for m in re.findall(r'id="message-(\d+)"', f)]
    later = [m for m in got if m > first]
    assert later == sorted(missed + [other])
    assert len(got) == len(set(got))  # nothing twice
    bob.close()


@pytest.mark.parametrize("case", ["anonymous", "foreign-origin", "logged-out"])
def test_handshake_refusals(servers, chat, case):
    a, _b = servers
    url = a.url.replace("http", "ws") + "/ws"
    client = http_login(a.url, "alice")
    headers, origin, expected = [f"Cookie: {cookie_header(client)}"], a.url, 401
    if case == "anonymous":
        headers = []
    elif case == "foreign-origin":
        origin, expected = "https://evil.example", 403
    else:
        saved = cookie_header(client)
        client.post("/auth/logout", data={"csrf_token": csrf_of(client)})
        headers = [f"Cookie: {saved}"]  # a copied cookie of a signed-out session
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(url, header=headers, origin=origin, timeout=5)
    assert info.value.status_code == expected


def test_the_handshake_declines_compression(servers, chat):
    """Browsers offer permessage-deflate; the server answers without any extension."""
    a, _b = servers
    client = http_login(a.url, "alice")
    ws = websocket.create_connection(
        a.url.replace("http", "ws") + "/ws", origin=a.url, timeout=10,
        header=[f"Cookie: {cookie_header(client)}",
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"])
    try:
        assert ws.getstatus() == 101
        assert "sec-websocket-extensions" not in {k.lower() for k in ws.getheaders()}
        mid = send_http(client, chat["direct"], "plain frames")
        ws.settimeout(10)
        while f"message-{mid}" not in (frame := ws.recv()):  # an uncompressed frame reads as text
            pass
        assert "plain frames" in frame
    finally:
        ws.close()


def test_logout_closes_that_sessions_sockets(servers, chat):
    a, b = servers
    client = http_login(a.url, "alice")
    other_session = http_login(b.url, "alice")
    mine, other = Socket(b, client), Socket(b, other_session)
    mine.ready()
    other.ready()
    client.post("/auth/logout", data={"csrf_token": csrf_of(client)})
    mine.ws.settimeout(5)
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        while True:
            mine.ws.recv()
    mid = send_http(http_login(b.url, "bob"), chat["direct"], "still here?")
    other.wait_for(f"message-{mid}")  # the other session keeps its socket
    other.close()


def test_sigterm_closes_sockets_with_1012(app, chat):
    server = WebServer(app).start()
    try:
        sock = Socket(server, http_login(server.url, "bob"))
        sock.ready()
        os.killpg(server.proc.pid, signal.SIGTERM)
        assert sock.close_code() == 1012
    finally:
        server.stop()


def test_redis_outage_send_still_commits_then_live_push_resumes_and_replay_fills_gap(app, chat):
    redis_server = RedisServer().start()  # fails without redis-server where the suite must run whole
    server = WebServer(app, REDIS_URL=redis_server.url)
    try:
        server.start()
        alice = http_login(server.url, "alice")
        bob = Socket(server, http_login(server.url, "bob"))
        bob.ready()
        first = send_http(alice, chat["direct"], "before outage")
        bob.wait_for(f"message-{first}")
        redis_server.stop()
        during = send_http(alice, chat["direct"], "during outage")  # 201, no 5xx
        redis_server.start()
        # The listener resubscribes and replays what its sockets missed.
        bob.wait_for(f"message-{during}", timeout=20)
        after = send_http(alice, chat["direct"], "after outage")
        bob.wait_for(f"message-{after}", timeout=10)
        bob.close()
    finally:
        server.stop()
        redis_server.stop()


def test_presence_follows_open_sockets_across_processes(app, servers, chat):
    from webchat.extensions import redis_store
    from webchat.presence import online_user_ids

    a, b = servers
    with app.app_context():
        assert online_user_ids(redis_store.client, [chat["bob"]]) == set()
    bob = Socket(a, http_login(a.url, "bob"))
    deadline = time.time() + 5
    with app.app_context():
        while time.time() < deadline and not online_user_ids(redis_store.client, [chat["bob"]]):
            time.sleep(0.1)
        assert online_user_ids(redis_store.client, [chat["bob"], chat["carol"]]) == {chat["bob"]}
    alice = http_login(b.url, "alice")
    assert 'class="dot online"' in alice.get(f"/conversations/{chat['direct']}").text.split('id="presence"')[1][:200]
    bob.close()
    with app.app_context():
        deadline = time.time() + 5
        while time.time() < deadline and online_user_ids(redis_store.client, [chat["bob"]]):
            time.sleep(0.1)
        assert online_user_ids(redis_store.client, [chat["bob"]]) == set()


def test_a_peer_that_stops_reading_is_dropped_and_does_not_hold_up_others(app, chat):
    """A socket whose TCP window stays full must not stall delivery to everyone else."""
    import socket as pysocket
    import threading

    # 700 frames in a burst: rate limits and the inbox out of the way.
    server = WebServer(app, WS_SEND_TIMEOUT=1, config=UNLIMITED).start()
    try:
        bob_client = http_login(server.url, "bob")
        stuck = websocket.create_connection(
            server.url.replace("http", "ws") + "/ws", header=[f"Cookie: {cookie_header(bob_client)}"],
            origin=server.url, timeout=10, sockopt=((pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 4096),))
        carol = Socket(server, http_login(server.url, "carol"))
        alice = Socket(server, http_login(server.url, "alice"))
        carol.ready()
        alice.ready()
        draining = threading.Event()

        def drain(sock):  # alice reads her own echoes so only bob is stuck
            while not draining.is_set():
                try:
                    sock.ws.recv()
                except Exception:
                    return
        threading.Thread(target=drain, args=(alice,), daemon=True).start()
        body = "x" * 3900
        for i in range(700):
            alice.send(type="message", conversation_id=chat["group"], body=f"{i} {body}")
        alice.send(type="message", conversation_id=chat["group"], body="the last one")
        carol.wait_for("the last one", timeout=60)
        draining.set()
        # bob's socket was cut off by the server: reading what was buffered ends in a closed connection.
        stuck.settimeout(10)
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
            while True:
                if stuck.recv() == "":
                    raise websocket.WebSocketConnectionClosedException("closed")
        with open(server.log.name, "rb") as fh:
            assert b"stopped reading: dropping it" in fh.read()
    finally:
        server.stop()


def test_socket_writes_are_whole_frames_even_when_the_peer_reads_slowly():
    """simple-websocket writes a frame with one send(), which may write only part of it."""
    import socket as pysocket
    import threading

    from webchat.realtime.transport import WholeWrites

    server_end, peer = pysocket.socketpair()
    try:
        server_end.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, 4096)
        server_end.settimeout(5)  # as under gevent: wait until writable, then one send()
        frames = [bytes([65 + i]) * 200_000 for i in range(4)]
        # The library's own call on this socket writes less than a frame:
        assert server_end.send(frames[0]) < len(frames[0])
        server_end.close()
        server_end, peer = pysocket.socketpair()
        server_end.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, 4096)
        server_end.settimeout(5)
        whole = WholeWrites(server_end)
        received = bytearray()

        def read():
            while len(received) < sum(map(len, frames)):
                chunk = peer.recv(65536)
                if not chunk:
                    return
                received.extend(chunk)
                time.sleep(0.001)  # a slow reader keeps the window small

        reader = threading.Thread(target=read)
        reader.start()
        writers = [threading.Thread(target=whole.send, args=(frame,)) for frame in frames]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(30)
        reader.join(30)
        # Every frame arrived whole and unbroken by another (in whichever order the writers ran).
        assert len(received) == sum(map(len, frames))
        runs = [received[i:i + 200_000] for i in range(0, len(received), 200_000)]
        assert sorted(bytes(run) for run in runs) == frames
    finally:
        server_end.close()
        peer.close()


@pytest.mark.parametrize("frame", [
    '{"type": "message", "conversation_id": 1, "body": 5}',
    '{"type": "message", "conversation_id": 1, "body": "x", "client_id": 7}',
    '{"type": "join", "conversation_id": Infinity}',
    '{"type": "join", "conversation_id": 99999999999999999999999}',
    '{"type": "message", "conversation_id": 1, "body": "nul\\u0000byte"}',
    '[1, 2]',
])
def test_odd_frames_get_error_frames_and_the_socket_stays(servers, chat, frame):
    a, _b = servers
    alice = Socket(a, http_login(a.url, "alice"))
    alice.ws.send(frame)
    assert "ws-error" in alice.wait_for("ws-error")
    alice.frames.clear()
    alice.send(type="message", conversation_id=chat["direct"], body="still alive")
    alice.wait_for("still alive")
    alice.close()


def test_huge_after_is_accepted(servers, chat):
    a, _b = servers
    client = http_login(a.url, "alice")
    sock = Socket(a, client, after=10**30)
    sock.send(type="message", conversation_id=chat["direct"], body="after huge")
    sock.wait_for("after huge")
    sock.close()


def test_removed_member_gets_no_typing_hints(app, servers, chat):
    a, b = servers
    alice, carol = http_login(a.url, "alice"), http_login(b.url, "carol")
    carol_sock = Socket(b, carol)
    carol_sock.send(type="join", conversation_id=chat["group"])
    alice_sock, bob_sock = Socket(a, alice), Socket(a, http_login(a.url, "bob"))
    carol_sock.ready()
    alice_sock.send(type="typing", conversation_id=chat["group"])
    carol_sock.wait_for("Alice is typing")  # a member sees it
    carol_sock.frames.clear()
    response = alice.post(f"/conversations/{chat['group']}/members/{chat['carol']}/remove",
                          data={"csrf_token": csrf_of(alice)})
    assert response.status_code == 303
    bob_sock.send(type="typing", conversation_id=chat["group"])
    bob_sock.ready()  # bob's hint has been published
    flush(app, carol_sock, chat["carol"])  # and has reached carol, or never will
    assert not any("is typing" in frame for frame in carol_sock.frames)
    carol_sock.close()
    bob_sock.close()
    alice_sock.close()
