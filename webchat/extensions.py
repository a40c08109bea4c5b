"""Flask extensions, created unbound and bound in create_app()."""
from __future__ import annotations

import redis
from flask import Flask, current_app
from flask_babel import Babel
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_sock import Sock
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


class RedisClient:
    """Hold one redis-py client per app, built from the app's REDIS_URL."""

    def init_app(self, app: Flask) -> None:
        # Short timeouts: a dead Redis must fail a health check or a publish quickly, not hang it.
        client = redis.Redis.from_url(
            app.config["REDIS_URL"], socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
        )
        app.extensions["redis"] = client
        # Pub/sub channels are server-wide: Redis's database numbers do not separate them. The
        # events' channel carries the number, so apps sharing a server on different databases
        # (two sites, a test run) never hear each other's events.
        app.extensions["redis_channel"] = f"webchat:events:{client.connection_pool.connection_kwargs.get('db', 0)}"

    @property
    def client(self) -> redis.Redis:
        return current_app.extensions["redis"]

    @property
    def channel(self) -> str:
        """The pub/sub channel of this app's events (see init_app)."""
        return current_app.extensions["redis_channel"]


# Sessions live for one request, event or socket frame, so objects need not be reloaded after a
# commit: rendering the reply to a send would otherwise read back the rows it just wrote.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
migrate = Migrate()
login_manager = LoginManager()
csrf = CSRFProtect()
limiter = Limiter(key_func=get_remote_address)
sock = Sock()
babel = Babel()
redis_store = RedisClient()
