"""Admin views (admin flag required): parse the request, call one service, render."""
from __future__ import annotations

from flask import abort, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_login import current_user, login_required

from ..services import DomainError
from ..services import admin as service
from ..web import refusal
from . import bp
from .forms import AdminFlagForm, SearchForm


@bp.before_request
@login_required
def require_admin():
    """Let only admins in: everyone else gets 403."""
    if not current_user.is_admin:
        abort(403)


def _me():
    return current_user._get_current_object()


def _back(default: str) -> str:
    """Return the form's `next` if it is an admin page of this site, else the default."""
    target = request.form.get("next", "")
    if target.startswith("/admin/") and "//" not in target and "\\" not in target:
        return target
    return default


def _refuse(exc: DomainError, page=None):
    """Refuse with the page re-rendered around the message (see webchat.refusal)."""
    return refusal(exc, page)


def _search_args() -> tuple[str, int]:
    form = SearchForm(formdata=request.args)
    return (form.q.data or "").strip()[:64], form.page.data or 1


# -- dashboard --------------------------------------------------------------------------------

def _dashboard_page(error: str | None = None):
    return render_template("admin/dashboard.html", board=service.dashboard(), error=error)


@bp.get("/")
def dashboard():
    """Show the admin dashboard: counts, retention, queue and the audit log."""
    return _dashboard_page()


@bp.post("/retention/run")
def run_retention():
    """Queue a retention purge now."""
    try:
        service.run_retention_now(_me())
    except DomainError as exc:
        return _refuse(exc, _dashboard_page)
    return redirect(url_for("admin.dashboard", queued=1), 303)


# -- users ------------------------------------------------------------------------------------

@bp.get("/users")
def users():
    """Search and page through users."""
    q, page = _search_args()
    return render_template("admin/users.html", page=service.search_users(q, page), q=q)


def _user_page(uid: int, error: str | None = None):
    return render_template("admin/user.html", details=service.user_details(uid), error=error)


@bp.get("/users/<int:uid>")
def user(uid: int):
    """Show one user: conversations, messages sent, last seen and the actions."""
    try:
        return _user_page(uid)
    except DomainError as exc:
        return _refuse(exc)


def _user_action(uid: int, action):
    """Run one action on a user and go back, or show the user's page with the refusal."""
    try:
        action()
    except DomainError as exc:
        return _refuse(exc, lambda error: _user_page(uid, error))
    return redirect(_back(url_for("admin.user", uid=uid)), 303)


@bp.post("/users/<int:uid>/disable")
def disable_user(uid: int):
    """Disable a user: they cannot sign in and their open sockets close."""
    return _user_action(uid, lambda: service.set_disabled(_me(), uid, True))


@bp.post("/users/<int:uid>/enable")
def enable_user(uid: int):
    """Enable a disabled user again."""
    return _user_action(uid, lambda: service.set_disabled(_me(), uid, False))


@bp.post("/users/<int:uid>/admin")
def set_admin(uid: int):
    """Grant (grant=1) or revoke (grant=0) the admin flag."""
    form = AdminFlagForm()
    if not form.validate_on_submit():
        return _refuse(DomainError(_("Send grant=1 or grant=0."), 422), lambda error: _user_page(uid, error))
    return _user_action(uid, lambda: service.set_admin(_me(), uid, bool(form.grant.data)))


@bp.post("/users/<int:uid>/delete")
def delete_user(uid: int):
    """Delete a user with their 1:1 conversations and messages; their groups change hands."""
    try:
        service.delete_user(_me(), uid)
    except DomainError as exc:
        return _refuse(exc, lambda error: _user_page(uid, error))
    return redirect(url_for("admin.users"), 303)


# -- conversations ----------------------------------------------------------------------------

@bp.get("/conversations")
def conversations():
    """Search conversations by member or group name, and page through them."""
    q, page = _search_args()
    return render_template("admin/conversations.html", page=service.search_conversations(q, page), q=q)


@bp.get("/conversations/<int:cid>")
def conversation(cid: int):
    """Show a conversation's members and message count, without the messages."""
    try:
        details = service.conversation_details(cid)
    except DomainError as exc:
        return _refuse(exc)
    return render_template("admin/conversation.html", details=details)


@bp.post("/conversations/<int:cid>/delete")
def delete_conversation(cid: int):
    """Delete a conversation with its messages and images."""
    try:
        service.delete_conversation(_me(), cid)
    except DomainError as exc:
        return _refuse(exc)
    return redirect(_back(url_for("admin.conversations")), 303)
