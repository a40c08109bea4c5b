"""Admin views (admin flag required)."""
from __future__ import annotations

from flask import abort, render_template
from flask_login import current_user, login_required

from . import bp


@bp.before_request
@login_required
def require_admin():
    """Let only admins in: everyone else gets 403."""
    if not current_user.is_admin:
        abort(403)


@bp.get("/")
def dashboard():
    """Show the admin dashboard."""
    return render_template("admin/dashboard.html")
