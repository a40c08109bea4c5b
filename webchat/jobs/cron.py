"""rq cron configuration: the retention purge on RETENTION_CRON (default hourly).

Cron strings are read in the clock process's local time zone (set TZ to change it).
Run exactly one clock process: rq cron has no leader election.
"""
from rq import cron

from webchat.config import Config
from webchat.jobs import purge_expired_messages_job

_config = Config()
cron.register(purge_expired_messages_job, queue_name=_config.RQ_QUEUE, cron=_config.RETENTION_CRON,
              job_timeout=3600)
