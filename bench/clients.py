"""Client side of the benchmarks: signing in, opening sockets, sending, and timing deliveries.

A message body carries a token `zq<seq>z`; every frame a socket receives is searched for tokens,
so the time from send to arrival is measured on each socket, whatever the frame's markup.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin

from .seed import PASSWORD, BenchUser, Conv

TOKEN_RE = re.compile(r"zq(\d+)z")
CSRF_RE = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
HTTP_TIMEOUT = httpx.Timeout(30.0)


@dataclass
class Sent:
    """One message in flight: when it was sent and how many socket deliveries it expects."""

    t0: float
    members: frozenset[int]
    expected: int
    received: int = 0
    done: asyncio.Event | None = None
    acked: bool = False
    group: bool = False


@dataclass
class Recorder:
    """Everything a run measures on the client side."""

    sent: dict[int, Sent] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    latency_sent_at: list[float] = field(default_factory=list)  # the send time of each latency above
    by_kind: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})  # by Sent.group
    send_latencies: list[float] = field(default_factory=list)  # HTTP round trip / WS write
    send_sent_at: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    frames: int = 0
    frame_bytes: int = 0

    def expect(self, seq: int, members: frozenset[int], expected: int, wait: bool = False,
               group: bool = False) -> Sent:
        item = Sent(time.perf_counter(), members, expected, done=asyncio.Event() if wait else None, group=group)
        self.sent[seq] = item
        return item

    def on_frame(self, sock: "BenchSocket", frame: str, now: float) -> None:
        self.frames += 1
        self.frame_bytes += len(frame)
        for raw in set(TOKEN_RE.findall(frame)):
            seq = int(raw)
            if seq in sock.seen:  # the same text again (e.g. in a later list-row frame)
                continue
            sock.seen.add(seq)
            item = self.sent.get(seq)
            if item is None:
                self.errors["frame for an unknown message"] += 1
                continue
            if sock.user not in item.members:
                self.errors["delivered to a non-member"] += 1
                continue
            self.latencies.append(now - item.t0)
            self.latency_sent_at.append(item.t0)
            self.by_kind[item.group].append(now - item.t0)
            item.received += 1
            if item.done is not None and item.received >= item.expected:
                item.done.set()

    def lost(self) -> int:
        return sum(max(0, s.expected - s.received) for s in self.sent.values())


@dataclass
class BenchSocket:
    index: int
    user: int  # index of the BenchUser
    ws: ClientConnection | None = None
    seen: set[int] = field(default_factory=set)
    open: bool = False
    reader: asyncio.Task | None = None


class Target:
    """How to sign in to, connect to and send through one server (webchat or the relay)."""

    name = "target"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.ws_base = "ws" + base_url[len("http"):]
        self.http: dict[int, httpx.AsyncClient] = {}

    async def sign_in(self, users: list[BenchUser], concurrency: int, recorder: Recorder) -> None:
        for user in users:
            self.http[user.index] = httpx.AsyncClient(base_url=self.base_url, timeout=HTTP_TIMEOUT,
                                                      # gunicorn drops idle keep-alive connections after 2 s:
                                                      # reusing one at that moment fails the request.
                                                      limits=httpx.Limits(max_connections=8, keepalive_expiry=1.0))

    async def close(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.http.values()))

    def ws_request(self, user: BenchUser) -> tuple[str, dict]:
        raise NotImplementedError

    async def send_http(self, user: BenchUser, conv: Conv, text: str, client_id: str) -> str | None:
        """Send over HTTP; return an error description or None."""
        raise NotImplementedError

    def ws_frame(self, user: BenchUser, conv: Conv, text: str, client_id: str) -> str:
        raise NotImplementedError

    def is_error_frame(self, frame: str) -> bool:
        return False


class WebchatTarget(Target):
    name = "webchat"

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.csrf: dict[int, str] = {}
        self.cookie: dict[int, str] = {}

    async def sign_in(self, users: list[BenchUser], concurrency: int, recorder: Recorder) -> None:
        """Sign every user in through GET/POST /auth/login, as a browser does."""
        await super().sign_in(users, concurrency, recorder)
        gate = asyncio.Semaphore(concurrency)

        async def one(user: BenchUser) -> None:
            client = self.http[user.index]
            async with gate:
                try:
                    page = await client.get("/auth/login")
                    token = CSRF_RE.search(page.text).group(1)
                    reply = await client.post("/auth/login", data={"username": user.username,
                                                                    "password": PASSWORD, "csrf_token": token})
                except (httpx.HTTPError, AttributeError) as exc:
                    recorder.errors[f"sign-in {type(exc).__name__}"] += 1
                    return
            if reply.status_code != 303 or "session" not in client.cookies:
                recorder.errors[f"sign-in HTTP {reply.status_code}"] += 1
                return
            self.csrf[user.index] = token
            self.cookie[user.index] = client.cookies["session"]
            # From now on the session goes as a plain header, as a browser sends it: httpx's cookie
            # jar (the standard library's cookiejar) costs the load generator more per request than
            # a browser's, and only webchat's requests would pay it.
            client.cookies.clear()
            client.headers["Cookie"] = f"session={self.cookie[user.index]}"

        await asyncio.gather(*(one(u) for u in users))

    def ws_request(self, user: BenchUser) -> tuple[str, dict]:
        return self.ws_base + "/ws", {"Cookie": f"session={self.cookie.get(user.index, '')}"}

    async def send_http(self, user: BenchUser, conv: Conv, text: str, client_id: str) -> str | None:
        reply = await self.http[user.index].post(
            f"/conversations/{conv.cid}/messages", data={"body": text, "client_id": client_id},
            headers={"X-CSRFToken": self.csrf.get(user.index, "")})
        return None if reply.status_code in (200, 201, 303) else f"send HTTP {reply.status_code}"

    def ws_frame(self, user: BenchUser, conv: Conv, text: str, client_id: str) -> str:
        return json.dumps({"type": "message", "conversation_id": conv.cid, "body": text, "client_id": client_id})

    def is_error_frame(self, frame: str) -> bool:
        return 'id="ws-error"' in frame


class RelayTarget(Target):
    name = "relay"

    def __init__(self, base_url: str, users: list[BenchUser], name: str = "relay") -> None:
        super().__init__(base_url)
        # "relay"; "relay-db" when the relay writes each message first; "relay-sql" when it runs
        # webchat's send transaction, which needs the conversation's and the sender's webchat ids.
        self.name = name
        self.keys = {u.index: u.username for u in users}
        self.uids = {u.index: u.uid for u in users} if name == "relay-sql" else None

    def _ids(self, user: BenchUser, conv: Conv, client_id: str) -> dict:
        return {"cid": conv.cid, "uid": user.uid, "client_id": client_id} if self.uids is not None else {}

    def _to(self, conv: Conv) -> str:
        return ",".join(self.keys[m] for m in conv.members)

    def ws_request(self, user: BenchUser) -> tuple[str, dict]:
        return f"{self.ws_base}/ws?key={user.username}", {}

    async def send_http(self, user: BenchUser, conv: Conv, text: str, client_id: str) -> str | None:
        reply = await self.http[user.index].post("/send", data={"to": self._to(conv), "text": text,
                                                                "from": user.username,
                                                                **self._ids(user, conv, client_id)})
        return None if reply.status_code == 204 else f"send HTTP {reply.status_code}"

    def ws_frame(self, user: BenchUser, conv: Conv, text: str, client_id: str) -> str:
        return json.dumps({"to": self._to(conv), "text": text, **self._ids(user, conv, client_id)})


async def open_sockets(target: Target, users: list[BenchUser], per_user: int, recorder: Recorder,
                       concurrency: int = 50, read: bool = True) -> list[BenchSocket]:
    """Open `per_user` sockets for every user (a few handshakes at a time) and start reading them."""
    gate = asyncio.Semaphore(concurrency)
    sockets = [BenchSocket(i * per_user + k, u.index) for i, u in enumerate(users) for k in range(per_user)]
    origin = Origin(target.base_url)
    by_index = {u.index: u for u in users}

    async def reader(sock: BenchSocket) -> None:
        try:
            async for frame in sock.ws:
                now = time.perf_counter()
                if isinstance(frame, bytes):
                    frame = frame.decode("utf-8", "replace")
                if target.is_error_frame(frame):
                    recorder.errors["error frame"] += 1
                recorder.on_frame(sock, frame, now)
        except Exception as exc:  # noqa: BLE001 - any socket failure is counted, not raised
            recorder.errors[f"socket error {type(exc).__name__}"] += 1
        finally:
            if sock.open:
                sock.open = False
                recorder.errors["socket closed during run"] += 1

    async def one(sock: BenchSocket) -> None:
        url, headers = target.ws_request(by_index[sock.user])
        async with gate:
            try:
                sock.ws = await connect(url, additional_headers=headers, origin=origin, compression=None,
                                        ping_interval=None, max_size=None, open_timeout=60, close_timeout=2)
            except Exception as exc:  # noqa: BLE001
                recorder.errors[f"connect failed: {type(exc).__name__} {exc}"[:120]] += 1
                return
        sock.open = True
        if read:
            sock.reader = asyncio.create_task(reader(sock))

    await asyncio.gather(*(one(s) for s in sockets))
    return [s for s in sockets if s.open]


async def close_sockets(sockets: list[BenchSocket]) -> None:
    for sock in sockets:
        sock.open = False

    async def one(sock: BenchSocket) -> None:
        try:
            await sock.ws.close()
        except Exception:  # noqa: BLE001
            pass

    for start in range(0, len(sockets), 500):
        await asyncio.gather(*(one(s) for s in sockets[start:start + 500]))
