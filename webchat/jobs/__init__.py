"""RQ jobs: entry points that take plain values and build their own app context.

Nothing in the app imports this package: services queue jobs by their dotted name
(services.admin.run_retention_now), so the worker's imports never loop back into the app's.
"""
from __future__ import annotations

from functools import lru_cache

from webchat import create_app
from webchat.services.retention import purge_expired_messages


@lru_cache(maxsize=1)
def _app():
    return create_app()


def purge_expired_messages_job(days: int | None = None, trigger: str = "cron") -> dict:
    """Run the retention purge inside an app context; return what it did."""
    app = _app()
    with app.app_context():
        result = purge_expired_messages(days or app.config["RETENTION_DAYS"], trigger=trigger)
        if result is None:
            return {"skipped": "another purge holds the lock"}
        return vars(result)
