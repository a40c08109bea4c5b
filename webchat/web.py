"""Request helpers every blueprint shares: htmx or not, who is signed in, refusing a request."""
from __future__ import annotations

import re

from flask import Response, g, render_template, request, session
from flask_login import current_user, logout_user

from .services import DomainError
from .services.accounts import SignedIn, parse_cookie_id


def is_htmx() -> bool:
    """Say whether this request came from htmx and wants a fragment."""
    return request.headers.get("HX-Request") == "true"


def signed_in_user_id() -> int | None:
    """The signed-in user's id from the session cookie, without reading the user's row.

    Only for routes whose service checks the account itself (a send checks the sender is an
    active member in its own statement); anything else uses Flask-Login's current_user. The
    app's check_signed_in_session hook has already signed out a cookie whose session ended.
    """
    parsed = parse_cookie_id(session.get("_user_id"))  # where Flask-Login keeps "<user id>:<token>"
    return parsed[0] if parsed else None


def signed_in_session() -> SignedIn | None:
    """This request's signed-in session (accounts.SignedIn), or None when nobody is signed in."""
    if current_user.is_authenticated:  # a "keep me signed in" cookie is looked up here if need be
        return g.get("signed_in")
    return None


_BROWSERS = (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"), ("Chrome/", "Chrome"),
             ("Safari/", "Safari"))
_SYSTEMS = (("Android", "Android"), ("iPhone", "iPhone"), ("iPad", "iPad"), ("Windows", "Windows"),
            ("CrOS", "ChromeOS"), ("Mac OS X", "macOS"), ("Linux", "Linux"))


def device_label() -> str:
    """A short name for this request's browser, from its User-Agent ("Firefox · Linux"), for the sessions list."""
    agent = request.user_agent.string or ""
    # Order matters: Edge and Opera also say Chrome, Chrome says Safari, Android says Linux.
    browser = next((name for token, name in _BROWSERS if token in agent), "")
    system = next((name for token, name in _SYSTEMS if token in agent), "")
    if browser or system:
        return " · ".join(part for part in (browser, system) if part)
    return re.split(r"[/\s]", agent.strip(), maxsplit=1)[0][:40]  # "curl", "python-httpx"


def end_browser_session() -> None:
    """Sign this browser out: the session emptied, and its "keep me signed in" cookie deleted.

    Flask-Login deletes the remember cookie when the session says so ("_remember": "clear");
    emptying the session after logout_user() wiped that word, and the cookie signed the browser
    straight back in.
    """
    logout_user()
    session.clear()
    session["_remember"] = "clear"


def error_fragment(status: int, message: str) -> Response:
    """The message as a fragment htmx puts in #flash (it swaps 4xx answers: see base.html)."""
    response = Response(render_template("errors/_error.html", status=status, message=message), status=status)
    response.headers["HX-Retarget"] = "#flash"
    response.headers["HX-Reswap"] = "innerHTML"
    return response


def refusal(exc: DomainError, page=None):
    """Answer a refused request: the message in #flash for htmx, else `page(error=...)` or the error page."""
    if is_htmx():
        return error_fragment(exc.status, exc.message)
    if page is not None and exc.status != 404:
        try:
            return page(error=exc.message), exc.status
        except DomainError:  # the page itself is gone (a 404 behind the refusal)
            pass
    return render_template("errors/error.html", status=exc.status, message=exc.message), exc.status
