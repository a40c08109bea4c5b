"""webchat: a self-hosted real-time web chat."""
from __future__ import annotations

import logging
import os
import secrets
import time

from flask import Flask, current_app, g, jsonify, redirect, render_template, request, session, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_login import current_user
from flask_wtf.csrf import CSRFError
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import Pool
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from . import security
from .admin import bp as admin_bp
from .auth import bp as auth_bp
from .chat import bp as chat_bp
from .cli import register_cli
from .config import Config
from .embedded import embedded_redis_url, sqlite_url
from .extensions import babel, csrf, db, limiter, login_manager, migrate, redis_store, sock
from .health import bp as health_bp
from .realtime import bp as realtime_bp
from .realtime.hub import hub
from .services import DomainError
from .services.accounts import find_session
from .services.message_text import system_text
from .templating import register_filters
from .web import end_browser_session, error_fragment, is_htmx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def create_app(config: Config | dict | None = None) -> Flask:
    """Build the application: configuration, extensions, blueprints, errors and commands."""
    app = Flask(
        __name__,
        template_folder=os.path.join(ROOT, "templates"),
        static_folder=os.path.join(ROOT, "static"),
        instance_path=os.environ.get("INSTANCE_PATH") or os.path.join(ROOT, "instance"),
    )
    _configure(app, config)
    _init_extensions(app)
    _register_blueprints(app)
    _register_errors(app)
    _register_request_hooks(app)
    security.init_app(app)
    register_filters(app)
    register_cli(app)
    return app


def _configure(app: Flask, config) -> None:
    settings = config if config is not None else Config()
    if isinstance(settings, dict):
        base = Config()
        app.config.from_mapping({k: v for k, v in vars(base).items() if k.isupper()})
        app.config.from_mapping(settings)
    else:
        settings.check()
        app.config.from_mapping({k: v for k, v in vars(settings).items() if k.isupper()})
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = _dev_secret(app.instance_path)
    if not app.config.get("SQLALCHEMY_DATABASE_URI"):
        app.config["SQLALCHEMY_DATABASE_URI"] = sqlite_url(app.instance_path)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql"):
        # gevent runs many requests and the hub's planners at once in one process.
        # A steady pool: overflow connections are closed on checkin, and reconnecting costs more
        # than the query it was for.
        options = {"pool_size": 20, "max_overflow": 10, **app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {})}
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
    if not app.config.get("REDIS_URL"):
        app.config["REDIS_URL"] = embedded_redis_url(app.instance_path)
    url = app.config["REDIS_URL"]
    app.config.setdefault(
        "RATELIMIT_STORAGE_URI", "redis+unix://" + url[len("unix://"):] if url.startswith("unix://") else url
    )
    if app.config.get("PROXY_FIX"):
        n = int(app.config["PROXY_FIX"])
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)


def _dev_secret(instance_path: str) -> str:
    """Return a per-instance secret for the embedded setup, kept in instance/ so restarts keep sessions."""
    os.makedirs(instance_path, exist_ok=True)
    path = os.path.join(instance_path, "secret_key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    except FileExistsError:
        pass
    with open(path) as fh:
        return fh.read().strip()


PING_AFTER_IDLE = 10.0  # seconds a pooled connection may sit unused before it is checked on checkout


@event.listens_for(Pool, "checkin")
def _note_checkin(_dbapi_connection, record) -> None:
    if record is not None:
        record.info["checked_in"] = time.monotonic()


@event.listens_for(Pool, "checkout")
def _ping_if_idle(dbapi_connection, record, _proxy) -> None:
    """Check a connection that sat idle (the database may have restarted meanwhile) before use.

    SQLAlchemy's pessimistic pattern, but only after PING_AFTER_IDLE: pool_pre_ping's round trip
    on every checkout would double the push path's queries. A connection that dies while busy
    fails one statement, and SQLAlchemy then discards the whole pool.
    """
    last = record.info.get("checked_in")
    if last is None or time.monotonic() - last < PING_AFTER_IDLE:
        return
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
        dbapi_connection.rollback()
    except Exception as exc:
        raise DisconnectionError("connection lost while idle") from exc


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Every SQLite connection: WAL so readers do not block the writer, a busy timeout so
    # concurrent processes wait instead of failing, and foreign keys enforced.
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def _select_locale() -> str:
    languages = current_app.config["LANGUAGES"]
    lang = request.args.get("lang") or request.cookies.get("lang")
    if lang in languages:
        return lang
    return request.accept_languages.best_match(languages) or languages[0]


def _init_extensions(app: Flask) -> None:
    db.init_app(app)
    migrate.init_app(app, db, directory=os.path.join(ROOT, "migrations"))
    csrf.init_app(app)
    redis_store.init_app(app)
    limiter.init_app(app)
    sock.init_app(app)
    babel.init_app(app, locale_selector=_select_locale)
    hub.init_app(app)

    # Flask-Login's own context processor reads the user's row for every template, used or not;
    # the proxy reads it when a template does (pages do, a sent message's fragment does not).
    login_manager.init_app(app, add_context_processor=False)
    app.context_processor(lambda: {"current_user": current_user})
    login_manager.login_view = "auth.login"
    login_manager.login_message = None
    login_manager.session_protection = "basic"

    @login_manager.user_loader
    def load_user(cookie_id: str):
        # The cookies carry "<user id>:<session token>" (User.get_id). The request's hook has
        # usually found that session already; a "keep me signed in" cookie that starts a new
        # browser session is looked up here. An ended session, or a disabled or deleted
        # account, loads nobody, and its remember cookie is deleted.
        found = g.get("signed_in")
        if found is None or found.cookie_id != cookie_id:
            found = find_session(cookie_id)
            if found is None:
                session.pop("_user_id", None)
                session["_remember"] = "clear"
                return None
            g.signed_in = found
            session["sid"] = found.session.id
        return found.user

    @login_manager.unauthorized_handler
    def unauthorized():
        if is_htmx() or request.path.startswith("/ws"):
            return _("Please sign in."), 401
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")), 303)


def _register_blueprints(app: Flask) -> None:
    app.register_blueprint(auth_bp)
    app.register_blueprint(chat_bp)
    app.register_blueprint(admin_bp, url_prefix="/admin")
    app.register_blueprint(realtime_bp)
    app.register_blueprint(health_bp)


def _register_errors(app: Flask) -> None:
    def render_error(status: int, message: str):
        if request.path.startswith("/healthz"):
            return jsonify({"status": "error", "message": message}), status
        if is_htmx():
            return error_fragment(status, message)
        return render_template("errors/error.html", status=status, message=message), status

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        return render_error(400, _("Your form expired or was not sent by this site. Reload the page and try again."))

    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError):
        db.session.rollback()
        return render_error(exc.status, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        messages = {
            404: _("We could not find that page."),
            403: _("You are not allowed to do that."),
            413: _("That upload is too large."),
            429: _("Too many attempts. Wait a minute and try again."),
            405: _("That action is not allowed here."),
        }
        message = messages.get(exc.code or 500, exc.description or "")
        return render_error(exc.code or 500, message)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        db.session.rollback()
        return render_error(500, _("Something went wrong on our side. Please try again."))


def _register_request_hooks(app: Flask) -> None:
    @app.before_request
    def refuse_nul_bytes():
        # No field of ours may hold NUL, and PostgreSQL refuses it in text: say 400, not 500.
        values = list(request.args.values())
        if request.method != "GET" and request.mimetype in ("application/x-www-form-urlencoded",
                                                             "multipart/form-data"):
            values += list(request.form.values())
        if any("\x00" in value for value in values):
            return render_template("errors/error.html", status=400,
                                   message=_("The request contains a NUL character.")), 400

    @app.before_request
    def check_signed_in_session() -> None:
        # Every signed-in cookie names a row of user_sessions (accounts.find_session): a session
        # signed out anywhere, revoked or idle too long, or of a disabled account, is signed out
        # here on every request, whatever Redis knows. One indexed query, which also loads the
        # user for current_user and writes "last seen" at most every 5 minutes. session["sid"]
        # names the session for its sockets (a sign-out closes exactly those).
        if request.endpoint == "static":
            return
        cookie_id = session.get("_user_id")
        if cookie_id is None:
            # Only a "keep me signed in" cookie: Flask-Login's loader (load_user) checks it now,
            # before the view opens any transaction of its own.
            if current_app.config.get("REMEMBER_COOKIE_NAME", "remember_token") in request.cookies:
                current_user._get_current_object()
            return
        found = find_session(cookie_id)
        if found is None:
            end_browser_session()
            return
        g.signed_in = found
        if session.get("sid") != found.session.id:
            session["sid"] = found.session.id

    @app.context_processor
    def template_helpers():
        return {"is_htmx": is_htmx(), "current_locale": str(get_locale())}

    # A global, not a context value: the macros in chat/_macros.html are imported without context.
    app.jinja_env.globals["system_text"] = system_text

    @app.after_request
    def remember_language(response):
        if request.args.get("lang") in app.config["LANGUAGES"]:
            response.set_cookie("lang", request.args["lang"], max_age=365 * 86400, samesite="Lax", httponly=True)
        return response

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
