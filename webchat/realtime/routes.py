"""GET /ws: an authenticated, Origin-checked WebSocket fed by the hub."""
from __future__ import annotations

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
from .inbound import FrameRefused, Inbox, read_frame
from .limits import SocketLimits, Verdict
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


def handle_frame(client: Client, raw, limits: SocketLimits) -> str | None:
    """Act on one client frame; return an error frame to send back, or None."""
    config = current_app.config
    try:
        frame = read_frame(raw, config["WS_MAX_FRAME"], config.get("WS_MAX_DEPTH", 4))
    except FrameRefused as exc:
        return _error_frame(exc.message, exc.code)
    kind = frame.get("type")
    if kind == "ping":
        return None
    if kind not in ("message", "join", "typing"):
        return _error_frame(_("Unknown frame type."), "unknown_type")
    verdict = limits.verdict(kind, frame.get("conversation_id"))
    if verdict is Verdict.DROP:
        return None
    if verdict is Verdict.REFUSE:
        return _error_frame(_("You are sending messages too fast. Wait a moment and try again."), "rate_limited")
    if kind == "join" and frame.get("conversation_id") in (None, ""):
        client.joined = None
        return None
    return _act(client, kind, frame, raw)


def _act(client: Client, kind: str, frame: dict, raw: str) -> str | None:
    """Send a message, join a conversation or announce typing; return an error frame or None."""
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
    config = current_app.config
    inbox = Inbox(config.get("WS_INBOX_FRAMES", 64), config.get("WS_INBOX_CHARS", 256 * 1024))
    client = Client(socket, current_user.id, session.get("sid"), str(get_locale()),
                    send_timeout=config["WS_SEND_TIMEOUT"], inbox=inbox)
    after = request.args.get("after", type=int)
    if after is not None:
        after = max(0, min(after, MAX_ID))
    hub.add(client)
    try:
        if _catch_up(client, after):
            _serve(client, hub.limits.for_socket(client.user_id))
    finally:
        hub.remove(client)
        db.session.remove()


def _catch_up(client: Client, after: int | None) -> bool:
    """Replay what the socket missed, then let live frames through; False if the socket was closed."""
    # Not before this process hears live events: a message published between the replay's
    # query and the listener's subscription (a fresh process subscribes with its first
    # socket) would reach the socket by neither path.
    if not hub.wait_until_live(current_app.config.get("WS_SUBSCRIBE_WAIT", 5.0)):
        current_app.logger.warning("replaying before the event subscription is confirmed")
    try:
        if after is not None:
            hub.replay(client, after)
    except Exception:
        # The database is away: 1011 makes the browser retry, and the retry replays.
        db.session.rollback()
        current_app.logger.exception("replay failed")
        client.start_live()
        client.close(1011, "try again")
        return False
    client.start_live()
    return True


def _serve(client: Client, limits: SocketLimits) -> None:
    """Handle the socket's frames in order until it closes, or until it floods."""
    socket = client.ws
    while True:
        # Give the pooled connection back before blocking: an idle socket must not hold one.
        db.session.remove()
        raw = socket.receive()
        # receive() still hands out frames that arrived before the close: nobody is there to
        # answer, and each would cost a query (a flood's backlog kept workers busy for minutes).
        if not socket.connected:
            return
        if raw is None:
            continue
        if client.inbox.overflowed or not limits.admit_frame():
            _close_flooding(client)
            return
        error = handle_frame(client, raw, limits)
        if error:
            client.send(error)


def _close_flooding(client: Client) -> None:
    """Tell a socket that sends faster than any browser why, and close it with 1008."""
    client.send(_error_frame(_("Too many frames too fast: this connection is closed. Reload the page to "
                               "reconnect."), "rate_limited"))
    client.close(1008, "rate limited", linger=current_app.config.get("WS_CLOSE_LINGER", 1.0))
