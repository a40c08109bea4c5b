"""GET /healthz: is the database reachable, is Redis reachable."""
from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text

from .extensions import db, limiter, redis_store

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@limiter.exempt
def healthz():
    """Report the health of the database and Redis."""
    status = {"status": "ok", "database": "ok", "redis": "ok"}
    try:
        db.session.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "down"
        db.session.rollback()
        status["database"] = f"error: {type(exc).__name__}"
    try:
        redis_store.client.ping()
    except Exception as exc:
        status["redis"] = f"error: {type(exc).__name__}"
    healthy = status["database"] == "ok" and status["redis"] == "ok"
    if not healthy:
        status["status"] = "error"
    return jsonify(status), 200 if healthy else 503
