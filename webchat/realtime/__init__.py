"""Real time: the /ws endpoint (routes), the per-process hub and listener, rendering events to frames."""
from flask import Blueprint

bp = Blueprint("realtime", __name__)

from . import routes  # noqa: E402,F401
