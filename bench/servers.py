"""Start and stop what a benchmark needs: a scratch PostgreSQL database, a private Redis, gunicorn.

Everything started here runs in its own process group and is stopped by that group's id, so a
benchmark never leaves a server behind and never touches processes it did not start.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import psycopg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The webchat tree measured: this repository, or a snapshot given with --app-dir (the app changes
# under the benchmarks; a `git archive` snapshot keeps a before/after comparison fixed).
APP_DIR = os.environ.get("BENCH_APP_DIR") or ROOT


def use_app_dir(path: str | None) -> str:
    """Measure the webchat tree at `path` (servers, migrations and in-process imports); return it."""
    global APP_DIR
    if path:
        APP_DIR = os.path.abspath(path)
        os.environ["BENCH_APP_DIR"] = APP_DIR
    if APP_DIR != ROOT and APP_DIR not in sys.path:
        sys.path.insert(0, APP_DIR)
    return APP_DIR
VENV_BIN = os.path.dirname(sys.executable)
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
LOG_DIR = os.environ.get("BENCH_LOG_DIR", os.path.join(tempfile.gettempdir(), "webchat-bench"))


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_url(dbname: str) -> str:
    """Return the postgres:// URL of a database on the bench's PostgreSQL server."""
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{dbname}"


def create_database(dbname: str) -> str:
    """Create an empty database (dropping a leftover of the same name) and return its URL."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
        if os.environ.get("BENCH_ASYNC_COMMIT"):
            conn.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    return pg_url(dbname)


def drop_database(dbname: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def app_env(database_url: str, redis_url: str, **extra) -> dict:
    """Return the environment a webchat process runs with in the benchmarks."""
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SECRET_KEY": "bench-secret",
        "RATELIMIT_ENABLED": "0",
        "LOG_LEVEL": "WARNING",
        "INSTANCE_PATH": os.path.join(LOG_DIR, "instance"),
    })
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (APP_DIR, ROOT, env.get("PYTHONPATH")) if p)
    return env


def migrate(database_url: str, redis_url: str) -> None:
    """Run the app's migrations (flask db upgrade) against a database."""
    subprocess.run([os.path.join(VENV_BIN, "flask"), "--app", "wsgi", "db", "upgrade"], cwd=APP_DIR,
                   env=app_env(database_url, redis_url), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


@dataclass
class Server:
    """A process group we started: its leader's pid, its port and its log file."""

    name: str
    pid: int
    port: int
    log_path: str
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the whole process group: TERM, then KILL after a grace period."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)


def _spawn(name: str, argv: list[str], env: dict, port: int, cwd: str = ROOT) -> Server:
    os.makedirs(LOG_DIR, exist_ok=True)
    log_path = os.path.join(LOG_DIR, f"{name}-{port}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return Server(name, proc.pid, port, log_path, proc)


def _wait_http(server: Server, path: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited; see {server.log_path}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.name} did not answer {path} in {timeout}s; see {server.log_path}")


def start_redis() -> tuple[Server, str]:
    """Start a private, non-persistent redis-server.

    Not the shared 6379: the measured Redis should carry the bench's traffic alone.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found; pass --redis-url")
    port = free_port()
    server = _spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--maxclients", "20000"], dict(os.environ), port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return server, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError("redis-server did not start")


def start_gunicorn(name: str, app_spec: str, env: dict, port: int, workers: int, health: str) -> Server:
    """Start gunicorn with webchat's own config file (gevent workers) and wait until it answers."""
    env = dict(env, PORT=str(port), WEB_CONCURRENCY=str(workers))
    # No control socket: its default path (~/.gunicorn/gunicorn.ctl) is shared by every gunicorn
    # on the box, and the bench must not take it from (or hand it to) anyone else's server.
    argv = [os.path.join(VENV_BIN, "gunicorn"), "-c", "webchat/gunicorn_conf.py", "--no-control-socket", app_spec]
    # Both run from the measured tree's directory, with its gunicorn config; the relay's module
    # comes from this repository through PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (APP_DIR, ROOT, env.get("PYTHONPATH")) if p)
    server = _spawn(name, argv, env, port, cwd=APP_DIR)
    _wait_http(server, health)
    return server


def start_webchat(database_url: str, redis_url: str, port: int, workers: int, **extra_env) -> Server:
    return start_gunicorn("webchat", "wsgi:app", app_env(database_url, redis_url, **extra_env), port, workers,
                          "/healthz")


def start_relay(redis_url: str | None, port: int, workers: int, database_url: str | None = None,
                webchat_sql: bool = False) -> Server:
    env = dict(os.environ)
    for name in ("RELAY_REDIS_URL", "RELAY_DATABASE_URL", "RELAY_SQL"):
        env.pop(name, None)
    if redis_url:
        env["RELAY_REDIS_URL"] = redis_url
    if database_url:
        env["RELAY_DATABASE_URL"] = database_url
    if webchat_sql:
        env["RELAY_SQL"] = "webchat"
    return start_gunicorn("relay", "bench.relay:app", env, port, workers, "/healthz")


@contextmanager
def stopping(*servers: Server):
    """Stop these servers however the block ends."""
    try:
        yield
    finally:
        for server in servers:
            if server is not None:
                server.stop()


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


@contextmanager
def scratch_database(prefix: str, redis_url: str, keep: bool = False):
    """Create and migrate a database for one benchmark run; drop it afterwards unless kept.

    The name carries this process's id, so two benchmark runs at once never drop each other's.
    """
    dbname = f"{prefix}_{os.getpid()}"
    url = create_database(dbname)
    try:
        migrate(url, redis_url)
        yield url
    finally:
        if not keep:
            drop_database(dbname)


@contextmanager
def redis_for(args):
    """Yield the Redis URL to use: --redis-url as given, else a private server stopped afterwards."""
    if getattr(args, "redis_url", None):
        yield args.redis_url
        return
    server, url = start_redis()
    try:
        yield url
    finally:
        server.stop()
