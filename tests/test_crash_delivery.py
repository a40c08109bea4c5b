"""No message is lost when processes die: two web processes, a private Redis, kills and restarts mid-burst.

Members' tabs keep one socket on each web process and reconnect as the page does (`?after=` the
newest message they have); senders post over HTTP with a `client_id` and retry, on the other
process, until a send is acknowledged. Mid-burst Redis restarts, then one web process is killed
with SIGKILL and started again (twice): its tabs reconnect to a process whose listener is not
subscribed yet, the case where a message could reach neither the replay nor the live push.
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import websocket
from sqlalchemy import func

from tests.conftest import make_user
from tests.support import RedisServer, WebServer, cookie_header, csrf_of, http_login
from webchat.extensions import db
from webchat.models import Message
from webchat.services import conversations as convs

pytestmark = pytest.mark.processes

MEMBERS = ("alice", "bob", "carol", "dave")
SENDERS = {"alice": 0, "bob": 1, "carol": 0}  # each sender's first choice of web process
SEND_PAUSE = 0.02  # between one sender's acknowledged sends
KILLS = 2
MESSAGE_RE = re.compile(r'id="message-(\d+)"')


class Tab(threading.Thread):
    """A member's browser tab: a socket to one web process that reconnects with ?after=<newest seen>."""

    def __init__(self, name: str, server: WebServer, cookie: str, after: int) -> None:
        super().__init__(daemon=True, name=f"tab-{name}-{server.port}")
        self.member, self.server, self.cookie, self.newest = name, server, cookie, after
        self.connections: list[list[int]] = []  # message ids in arrival order, per connection
        self.live = threading.Event()  # the first connection answers frames: it is caught up
        self.stopping = threading.Event()
        self.ws: websocket.WebSocket | None = None

    def seen(self) -> set[int]:
        return {mid for ids in self.connections for mid in ids}

    def run(self) -> None:
        url = self.server.url.replace("http", "ws") + "/ws"
        while not self.stopping.is_set():
            try:
                self.ws = websocket.create_connection(f"{url}?after={self.newest}", origin=self.server.url,
                                                      header=[f"Cookie: {self.cookie}"], timeout=5)
            except (websocket.WebSocketException, OSError):
                time.sleep(0.05)  # the process is down: try again, as the page does
                continue
            self._read(self.ws)

    def _read(self, ws: websocket.WebSocket) -> None:
        ids: list[int] = []
        self.connections.append(ids)
        if not self.live.is_set():
            ws.send(json.dumps({"type": "barrier"}))  # answered once the socket is caught up
        ws.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                frame = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError):
                return
            if not frame:
                return  # the server closed the socket
            if 'data-code="unknown_type"' in frame:
                self.live.set()
            for mid in map(int, MESSAGE_RE.findall(frame)):
                ids.append(mid)
                self.newest = max(self.newest, mid)
        ws.close()

    def reconnect(self) -> None:
        """Drop the socket: the tab reconnects with ?after= its newest message, as after a network blip."""
        if self.ws is not None:
            self.ws.abort()


@dataclass
class Sent:
    message_id: int
    status: int  # 201 created, 200 already sent (a retry of a send that was stored)
    attempts: int


class Sender(threading.Thread):
    """One member posting to the group over HTTP, retrying each send (same client_id) until acknowledged."""

    def __init__(self, member: str, servers: list[WebServer], first: int, login: httpx.Client, cid: int) -> None:
        super().__init__(daemon=True, name=f"sender-{member}")
        self.member, self.servers, self.first, self.cid = member, servers, first, cid
        self.cookie, self.csrf = cookie_header(login), csrf_of(login)
        self.acked: dict[str, Sent] = {}
        self.server_errors: list[tuple[int, int]] = []  # (server port, status)
        self.stopping = threading.Event()

    def run(self) -> None:
        # Redis being away, a send waits out redis-py's retries (a few seconds) before answering.
        headers = {"Cookie": self.cookie, "X-CSRFToken": self.csrf, "HX-Request": "true"}
        with httpx.Client(timeout=30, headers=headers) as http:
            n = 0
            while not self.stopping.is_set():
                self._send(http, f"{self.member}-{n}")
                n += 1
                time.sleep(SEND_PAUSE)

    def _send(self, http: httpx.Client, client_id: str) -> None:
        attempts = 0
        while True:
            server = self.servers[(self.first + attempts) % len(self.servers)]
            attempts += 1
            try:
                reply = http.post(f"{server.url}/conversations/{self.cid}/messages",
                                  data={"body": f"burst {client_id}", "client_id": client_id})
            except httpx.HTTPError:
                time.sleep(0.05)  # that process is down or went down: retry elsewhere
                continue
            if reply.status_code >= 500:
                self.server_errors.append((server.port, reply.status_code))
                time.sleep(0.05)
                continue
            assert reply.status_code in (200, 201), reply.text
            self.acked[client_id] = Sent(int(MESSAGE_RE.search(reply.text).group(1)), reply.status_code, attempts)
            return


@pytest.fixture
def group(app):
    with app.test_request_context():
        people = [make_user(name) for name in MEMBERS]
        conversation = convs.create_group(people[0], "Crash", [p.id for p in people[1:]])
        return conversation.id


def test_no_acknowledged_message_is_lost_or_doubled_when_processes_die(app, group):
    redis_server = RedisServer().start()  # fails without redis-server where the suite must run whole
    web = [WebServer(app, REDIS_URL=redis_server.url), WebServer(app, REDIS_URL=redis_server.url)]
    tabs: list[Tab] = []
    senders: list[Sender] = []
    try:
        for server in web:
            server.start()
        logins = {name: http_login(web[0].url, name) for name in MEMBERS}
        with app.app_context():
            start = db.session.query(func.max(Message.id)).scalar() or 0
            db.session.remove()
        tabs = [Tab(name, server, cookie_header(logins[name]), start) for name in MEMBERS for server in web]
        for tab in tabs:
            tab.start()
        assert all(tab.live.wait(15) for tab in tabs), "a tab never caught up"
        senders = [Sender(name, web, first, logins[name], group) for name, first in SENDERS.items()]
        for sender in senders:
            sender.start()
        _disrupt(redis_server, web[0])
        for sender in senders:
            sender.stopping.set()
        for sender in senders:
            sender.join(60)
        _check(app, group, tabs, senders, web[0])
    finally:
        for thread in tabs + senders:
            thread.stopping.set()
        for server in web:
            server.stop()
        redis_server.stop()


def _disrupt(redis_server: RedisServer, victim: WebServer) -> None:
    """Mid-burst: restart Redis, then kill the victim process with SIGKILL and start it again, twice."""
    time.sleep(1.5)
    redis_server.stop()
    time.sleep(0.5)
    redis_server.start()
    time.sleep(2.0)
    for _ in range(KILLS):
        victim.kill()
        time.sleep(0.3)
        victim.start()
        time.sleep(1.5)


def _check(app, cid: int, tabs: list[Tab], senders: list[Sender], victim: WebServer) -> None:
    acked = {cid_: sent for sender in senders for cid_, sent in sender.acked.items()}
    assert len(acked) > 100, f"only {len(acked)} sends in the burst"
    # No 5xx: a process that dies answers nothing at all.
    errors = [(port, status) for sender in senders for port, status in sender.server_errors]
    assert not errors, f"server errors (victim on port {victim.port}): {errors}"
    _check_stored_once(app, cid, acked)
    sender_of = {sent.message_id: client_id.rsplit("-", 1)[0] for client_id, sent in acked.items()}
    for tab in tabs:
        _check_order(tab, sender_of)
    # A send the victim committed but died before publishing is acknowledged by the retry as
    # "already sent" (200): no process ever pushes it, and the tabs that did not reconnect get it
    # only by catching up. Everything else must have arrived live.
    unpushed = {sent.message_id for sent in acked.values() if sent.status == 200 and sent.attempts > 1}
    pushed = {sent.message_id for sent in acked.values()} - unpushed
    print(f"{len(acked)} sends acknowledged, {sum(s.attempts > 1 for s in acked.values())} after a retry, "
          f"{len(unpushed)} of them found stored already; connections per tab: "
          f"{[len(tab.connections) for tab in tabs]}")  # shown with -s, and on failure
    _wait_until_seen(tabs, pushed, "live (before any reconnect of their own)")
    for tab in tabs:
        tab.reconnect()
    _wait_until_seen(tabs, pushed | unpushed, "after catching up")
    for tab in tabs:
        _check_order(tab, sender_of)


def _check_stored_once(app, cid: int, acked: dict[str, Sent]) -> None:
    """Every acknowledged send is stored once, under the id it was acknowledged with; nothing else."""
    with app.app_context():
        rows = db.session.query(Message.client_id, Message.id).filter(
            Message.conversation_id == cid, Message.client_id.isnot(None)).all()
        db.session.remove()
    stored: dict[str, list[int]] = {}
    for client_id, mid in rows:
        stored.setdefault(client_id, []).append(mid)
    assert {k: v for k, v in stored.items() if len(v) > 1} == {}, "a retried send was stored twice"
    assert set(stored) == set(acked), f"stored but never acknowledged: {set(stored) - set(acked)}"
    assert {k: v[0] for k, v in stored.items()} == {k: s.message_id for k, s in acked.items()}


def _check_order(tab: Tab, sender_of: dict[int, str]) -> None:
    """On each connection: no message twice, and each sender's messages in the order they were sent."""
    for ids in list(tab.connections):
        assert len(ids) == len(set(ids)), f"{tab.name}: a message twice on one connection"
        for sender in set(sender_of.values()):
            theirs = [mid for mid in ids if sender_of.get(mid) == sender]
            assert theirs == sorted(theirs), f"{tab.name}: {sender}'s messages out of order: {theirs}"


def _wait_until_seen(tabs: list[Tab], expected: set[int], when: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(expected - tab.seen() for tab in tabs):
        time.sleep(0.1)
    missing = {tab.name: sorted(expected - tab.seen()) for tab in tabs if expected - tab.seen()}
    assert not missing, f"messages that never reached a tab {when}: {missing}"
