"""Real time: the /ws endpoint, the per-process hub and the Redis bus."""
from flask import Blueprint

bp = Blueprint("realtime", __name__)

from . import routes  # noqa: E402,F401
