"""GET /ws: an authenticated, Origin-checked WebSocket fed by the hub."""
from __future__ import annotations

import json
from urllib.parse import urlsplit

from flask import abort, current_app, render_template, request, session
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_login import current_user

from ..extensions import db, sock
from ..services import MAX_ID, AccountClosed, DomainError
from ..services import messages as msgs
from ..services.conversations import announce_typing
from ..services.membership import get_active_membership
from ..services.read_state import mark_read
from . import bp
from .hub import hub
from .transport import Client


def _origin_allowed(origin: str) -> bool:
    """Say whether a handshake's Origin is this site (or one the deployer allowed)."""
    if origin in current_app.config["WS_ALLOWED_ORIGINS"]:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()


@bp.before_request
def check_handshake():
    """Refuse the handshake before upgrading: no session 401, foreign Origin 403."""
    origin = request.headers.get("Origin")
    # Browsers always send Origin on WebSocket handshakes; a cross-site one is hijacking.
    if origin is not None and not _origin_allowed(origin):
        abort(403)
    # A signed-out session's copied cookie was already signed out by the app's
    # check_signed_in_session hook (it runs before this one).
    if not current_user.is_authenticated:
        abort(401)
    # Decline permessage-deflate (browsers always offer it; simple-websocket would accept): its zlib
    # state costs about 90 KB a socket once a frame has gone out, and deflating every frame for every
    # socket costs CPU on the push path. Frames stay plain; one encoding serves every socket.
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


def _error_frame(message: str, code: str = "bad_request") -> str:
    return render_template("realtime/_error.html", message=message, code=code)


def handle_frame(client: Client, raw) -> str | None:
    """Act on one client frame; return an error frame to send back, or None."""
    if isinstance(raw, bytes):
        return _error_frame(_("Frames must be JSON text."))
    if len(raw.encode()) > current_app.config["WS_MAX_FRAME"]:
        return _error_frame(_("That frame is too large."), "too_large")
    try:
        frame = json.loads(raw)
    except ValueError:
        return _error_frame(_("Frames must be JSON text."))
    if not isinstance(frame, dict):
        return _error_frame(_("Frames must be JSON objects."))
    kind = frame.get("type")
    if kind == "ping":
        return None
    if kind not in ("message", "join", "typing"):
        return _error_frame(_("Unknown frame type."), "unknown_type")
    if kind == "join" and frame.get("conversation_id") in (None, ""):
        client.joined = None
        return None
    try:
        if kind == "message":
            # The send checks membership and that the account is active itself (in its statement).
            msgs.send_to(client.user_id, frame.get("conversation_id"), frame.get("body"), None,
                         frame.get("client_id"))
            return None
        # The member's user comes with the membership check: one query.
        conversation, membership = get_active_membership(client.user_id, frame.get("conversation_id"))
        user = membership.user
        if kind == "join":
            client.joined = conversation.id
            mark_read(user.id, conversation)
        else:
            announce_typing(user, conversation)
    except AccountClosed:
        # Disabled or deleted since the socket opened (its close event may have been lost).
        client.close(1008, "account closed")
        return None
    except DomainError as exc:
        return _error_frame(exc.message, "not_found" if exc.status == 404 else "invalid")
    except Exception:  # a frame must never take the socket down
        db.session.rollback()
        current_app.logger.exception("frame failed: %r", raw[:200])
        return _error_frame(_("That frame could not be handled."), "server_error")
    return None


@sock.route("/ws", bp=bp)
def ws(socket):
    """Stream this user's live frames; accept message, join and typing frames."""
    client = Client(socket, current_user.id, session.get("sid"), str(get_locale()),
                    send_timeout=current_app.config["WS_SEND_TIMEOUT"])
    after = request.args.get("after", type=int)
    if after is not None:
        after = max(0, min(after, MAX_ID))
    hub.add(client)
    try:
        try:
            if after is not None:
                hub.replay(client, after)
        except Exception:
            # The database is away: 1011 makes the browser retry, and the retry replays.
            db.session.rollback()
            current_app.logger.exception("replay failed")
            client.start_live()
            client.close(1011, "try again")
            return
        client.start_live()
        while True:
            # Give the pooled connection back before blocking: an idle socket must not hold one.
            db.session.remove()
            raw = socket.receive()
            if raw is None:
                continue
            error = handle_frame(client, raw)
            if error:
                client.send(error)
    finally:
        hub.remove(client)
        db.session.remove()
