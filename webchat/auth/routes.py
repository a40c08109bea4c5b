"""Account views: thin wrappers around services.accounts."""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import current_app, flash, g, make_response, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import ngettext
from flask_login import current_user, login_required, login_user

from ..extensions import limiter
from ..services import AccountClosed, DomainError, accounts
from ..web import device_label, end_browser_session, refusal, signed_in_session
from . import bp
from .forms import TOO_LONG, DeleteAccountForm, LoginForm, PasswordForm, ProfileForm, RegisterForm


def _safe_next(target: str | None) -> str:
    """Return `next` if it is a same-site path, else the home page."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith("//") \
                and "\\" not in target:
            return target
    return url_for("chat.index")


def _too_long(field) -> bool:
    return len(field.data or "") > accounts.PASSWORD_MAX


def _enter(signed: accounts.SignedIn, remember: bool = False) -> None:
    """Sign this browser in to its new server-side session (a session it had before ends)."""
    previous = g.get("signed_in")
    login_user(signed.user, remember=remember)  # the cookies carry signed.user.get_id()
    session["sid"] = signed.session.id
    g.signed_in = signed
    if previous is not None and previous.session.id != signed.session.id:
        accounts.end_session(previous.session.id)


def _check_address_limit(message: str) -> None:
    """Refuse (503) a sign-in or registration whose per-address limit could not be checked.

    RATELIMIT_SWALLOW_ERRORS keeps the other routes up while the limiter's storage is away, and
    then the request has no current limit: these two routes must not run unlimited instead.
    """
    if limiter.enabled and limiter.current_limit is None:
        current_app.logger.error("%s refused: the per-address limit's storage is unreachable", request.path)
        raise DomainError(message, 503)


def _with_retry_after(response, exc: DomainError):
    """Say when to try again on a refusal of too many password attempts."""
    if isinstance(exc, accounts.TooManyAttempts):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _refused(template: str, form, exc: DomainError):
    """Answer a refused sign-in or registration on its own page, with Retry-After when it says when."""
    return _with_retry_after(make_response(render_template(template, form=form, error=exc.message), exc.status),
                             exc)


@bp.route("/auth/register", methods=["GET", "POST"])
# Only accounts created count: a taken name or a refused password costs no hash, nor a try.
@limiter.limit(lambda: current_app.config.get("RATELIMIT_REGISTER", "5 per hour"), methods=["POST"],
               deduct_when=lambda response: response.status_code == 303)
def register():
    """Create an account and sign in."""
    if current_user.is_authenticated:
        return redirect(url_for("chat.index"), 303)
    form = RegisterForm()
    error = None
    if request.method == "POST":
        try:
            _check_address_limit(_("Creating accounts is unavailable for a moment. Please try again shortly."))
            if form.validate_on_submit():
                user = accounts.sign_up(form.username.data, form.password.data, form.name.data or "")
                _enter(accounts.start_session(user, device_label()))
                return redirect(url_for("chat.index"), 303)
        except DomainError as exc:
            if exc.status != 422:
                return _refused("auth/register.html", form, exc)
            error = exc.message
    status = 422 if request.method == "POST" else 200
    return render_template("auth/register.html", form=form, error=error), status


@bp.route("/auth/login", methods=["GET", "POST"])
@limiter.limit(lambda: current_app.config["RATELIMIT_LOGIN"], methods=["POST"])
def login():
    """Sign in with username and password."""
    if current_user.is_authenticated and request.method == "GET":
        return redirect(_safe_next(request.args.get("next")), 303)
    form = LoginForm()
    if request.method == "GET":
        return render_template("auth/login.html", form=form)
    try:
        _check_address_limit(_("Signing in is unavailable for a moment. Please try again shortly."))
        valid = form.validate_on_submit()
        if _too_long(form.password):
            return render_template("auth/login.html", form=form, error=TOO_LONG), 422
        signed = accounts.sign_in(form.username.data, form.password.data, device_label()) if valid else None
    except AccountClosed as exc:
        return render_template("auth/login.html", form=form, error=exc.message), 401
    except DomainError as exc:  # this account must wait (429), or its limit is unreachable (503)
        return _refused("auth/login.html", form, exc)
    if signed is not None:
        _enter(signed, remember=bool(form.remember.data))
        return redirect(_safe_next(request.args.get("next") or request.form.get("next")), 303)
    # One message whatever was wrong: never say whether the username exists.
    return render_template("auth/login.html", form=form, error=_("Wrong username or password.")), 401


@bp.post("/auth/logout")
def logout():
    """Sign out: this browser's session ends for good, "keep me signed in" too, and its sockets close."""
    signed = signed_in_session()
    end_browser_session()
    if signed is not None:
        accounts.end_session(signed.session.id)
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


def _security_page(error: str | None = None, password_form: PasswordForm | None = None) -> str:
    """The password form and the list of this user's signed-in sessions, this browser's marked."""
    return render_template("auth/sessions.html", sessions=accounts.list_sessions(current_user.id),
                           this_session=signed_in_session().session.id, error=error,
                           password_form=password_form or PasswordForm())


@bp.get("/profile/sessions")
@login_required
def sessions():
    """List the browsers signed in to this account (device, created, last seen)."""
    return _security_page()


@bp.post("/profile/sessions/<session_id>/revoke")
@login_required
def revoke_session(session_id: str):
    """Sign out one of this account's sessions ("keep me signed in" included); its sockets close."""
    try:
        accounts.revoke_session(current_user.id, session_id)
    except DomainError as exc:
        return refusal(exc, _security_page)
    if session_id == signed_in_session().session.id:  # this browser's own: it is signed out now
        end_browser_session()
        return redirect(url_for("auth.login"), 303)
    flash(_("That session is signed out."), "saved")
    return redirect(url_for("auth.sessions"), 303)


@bp.post("/profile/sessions/revoke-others")
@login_required
def revoke_other_sessions():
    """Sign out every session of this account but this browser's."""
    ended = accounts.end_other_sessions(current_user.id, signed_in_session().session.id)
    flash(ngettext("%(num)d other session signed out.", "%(num)d other sessions signed out.", ended), "saved")
    return redirect(url_for("auth.sessions"), 303)


@bp.post("/profile/password")
@login_required
def change_password():
    """Change the password after checking the current one; every other session is signed out."""
    form = PasswordForm()
    if not form.validate_on_submit():
        return _security_page(password_form=form), 422
    try:
        ended = accounts.change_password(current_user._get_current_object(), form.current_password.data,
                                         form.new_password.data, signed_in_session().session.id)
    except DomainError as exc:
        return _with_retry_after(make_response(refusal(exc, lambda error: _security_page(error, form))), exc)
    flash(ngettext("Your password is changed. %(num)d other session was signed out.",
                   "Your password is changed. %(num)d other sessions were signed out.", ended), "saved")
    return redirect(url_for("auth.sessions"), 303)


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
    elif _too_long(form.password):
        error = TOO_LONG
    return render_template("auth/profile.html", form=ProfileForm(obj=current_user), error=None,
                           delete_form=form, delete_error=error), status
