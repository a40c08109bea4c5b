"""RQ jobs: entry points that take plain values and build their own app context."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _app():
    from webchat import create_app

    return create_app()


def purge_expired_messages_job(days: int | None = None, trigger: str = "cron") -> dict:
    """Run the retention purge inside an app context; return what it did."""
    from webchat.services.retention import purge_expired_messages

    app = _app()
    with app.app_context():
        result = purge_expired_messages(days or app.config["RETENTION_DAYS"], trigger=trigger)
        if result is None:
            return {"skipped": "another purge holds the lock"}
        return vars(result)


def enqueue_purge(trigger: str = "admin"):
    """Queue a purge now (the admin's "run now" button)."""
    from flask import current_app
    from rq import Queue

    from webchat.extensions import redis_store

    queue = Queue(current_app.config["RQ_QUEUE"], connection=redis_store.client)
    return queue.enqueue(purge_expired_messages_job, None, trigger, job_timeout=3600)
