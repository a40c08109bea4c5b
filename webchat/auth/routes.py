"""Account views: thin wrappers around services.accounts."""
from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from flask import current_app, flash, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_login import current_user, login_required, login_user

from ..extensions import limiter
from ..services import AccountClosed, DomainError, accounts
from ..web import end_browser_session
from . import bp
from .forms import DeleteAccountForm, LoginForm, ProfileForm, RegisterForm


def _safe_next(target: str | None) -> str:
    """Return `next` if it is a same-site path, else the home page."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith("//") \
                and "\\" not in target:
            return target
    return url_for("chat.index")


def _start_session(user, remember: bool = False) -> None:
    login_user(user, remember=remember)
    session["sid"] = secrets.token_urlsafe(12)


@bp.route("/auth/register", methods=["GET", "POST"])
def register():
    """Create an account and sign in."""
    if current_user.is_authenticated:
        return redirect(url_for("chat.index"), 303)
    form = RegisterForm()
    error = None
    if form.validate_on_submit():
        try:
            user = accounts.register_user(form.username.data, form.password.data, form.name.data or "")
        except DomainError as exc:
            error = exc.message
        else:
            _start_session(user)
            return redirect(url_for("chat.index"), 303)
    status = 422 if request.method == "POST" else 200
    return render_template("auth/register.html", form=form, error=error), status


@bp.route("/auth/login", methods=["GET", "POST"])
@limiter.limit(lambda: current_app.config["RATELIMIT_LOGIN"], methods=["POST"])
def login():
    """Sign in with username and password."""
    if current_user.is_authenticated and request.method == "GET":
        return redirect(_safe_next(request.args.get("next")), 303)
    form = LoginForm()
    error = None
    status = 200
    if request.method == "POST":
        try:
            user = accounts.authenticate(form.username.data or "", form.password.data or "") \
                if form.validate_on_submit() else None
        except AccountClosed as exc:
            return render_template("auth/login.html", form=form, error=exc.message), 401
        if user is not None:
            _start_session(user, remember=bool(form.remember.data))
            return redirect(_safe_next(request.args.get("next") or request.form.get("next")), 303)
        # One message whatever was wrong: never say whether the username exists.
        error = _("Wrong username or password.")
        status = 401
    return render_template("auth/login.html", form=form, error=error), status


@bp.post("/auth/logout")
def logout():
    """Sign out and close this session's sockets."""
    sid = session.get("sid")
    end_browser_session()
    if sid:
        accounts.revoke_session(sid)
    return redirect(url_for("auth.login"), 303)


@bp.route("/profile", methods=["GET", "POST"])
@login_required
def profile():
    """Show and change the signed-in user's profile."""
    form = ProfileForm(obj=current_user if request.method == "GET" else None)
    error = None
    status = 200
    if request.method == "POST":
        if form.validate_on_submit():
            try:
                accounts.update_profile(current_user, name=form.name.data, remark=form.remark.data or "",
                                        avatar=request.files.get("avatar"), background=request.files.get("background"))
            except DomainError as exc:
                error, status = exc.message, exc.status
            else:
                flash(_("Your profile is saved."), "saved")
                return redirect(url_for("auth.profile"), 303)
        else:
            status = 422
    return render_template("auth/profile.html", form=form, error=error,
                           delete_form=DeleteAccountForm()), status


@bp.post("/account/delete")
@login_required
def delete_account():
    """Delete the signed-in user's account after a password check."""
    form = DeleteAccountForm()
    error = _("Enter your password to delete your account.")
    status = 422
    if form.validate_on_submit():
        try:
            accounts.delete_account(current_user._get_current_object(), form.password.data)
        except DomainError as exc:
            error, status = exc.message, exc.status
        else:
            end_browser_session()
            return redirect(url_for("auth.register"), 303)
    return render_template("auth/profile.html", form=ProfileForm(obj=current_user), error=None,
                           delete_form=form, delete_error=error), status
