"""Start real processes for tests: gunicorn web servers, rq worker and rq cron."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CSRF_RE = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


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
    """One gunicorn (gevent) web process serving wsgi:app on a free port."""

    def __init__(self, app, workers: int = 1, **env) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = process_env(app, PORT=self.port, WEB_CONCURRENCY=workers, **env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WebServer":
        self.log = open(os.path.join(os.environ.get("INSTANCE_PATH", "/tmp"), f"gunicorn-{self.port}.log"), "ab")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "gunicorn"), "-c", os.path.join(ROOT, "webchat", "gunicorn_conf.py"),
             "-b", f"127.0.0.1:{self.port}", "wsgi:app"],
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
