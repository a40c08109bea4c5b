"""Request helpers every blueprint shares: htmx or not, who is signed in, refusing a request."""
from __future__ import annotations

from flask import Response, render_template, request, session
from flask_login import logout_user

from .services import DomainError


def is_htmx() -> bool:
    """Say whether this request came from htmx and wants a fragment."""
    return request.headers.get("HX-Request") == "true"


def signed_in_user_id() -> int | None:
    """The signed-in user's id from the session cookie, without reading the user's row.

    Only for routes whose service checks the account itself (a send checks the sender is an
    active member in its own statement); anything else uses Flask-Login's current_user.
    """
    user_id = session.get("_user_id")  # where Flask-Login keeps it
    return int(user_id) if isinstance(user_id, str) and user_id.isdigit() else None


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
