"""GET /healthz with Redis up and down."""
from webchat import create_app
from webchat.config import TestConfig
from tests.support import free_port


def test_healthz_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_healthz_reports_redis_down(app):
    config = TestConfig()
    config.SQLALCHEMY_DATABASE_URI = app.config["SQLALCHEMY_DATABASE_URI"]
    config.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    down = create_app(config)
    response = down.test_client().get("/healthz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["database"] == "ok"
    assert body["redis"].startswith("error")
    assert body["status"] == "error"


def test_healthz_reports_database_down(app, tmp_path):
    config = TestConfig()
    config.SQLALCHEMY_DATABASE_URI = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
    config.REDIS_URL = app.config["REDIS_URL"]
    down = create_app(config)
    response = down.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["database"].startswith("error")
    assert response.get_json()["redis"] == "ok"
