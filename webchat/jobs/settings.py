"""RQ settings module (rq worker/cron -c webchat.jobs.settings): the app's Redis and queue."""
import os

from webchat.config import Config
from webchat.embedded import embedded_redis_url

_config = Config()
_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REDIS_URL = _config.REDIS_URL or embedded_redis_url(os.environ.get("INSTANCE_PATH") or os.path.join(_root, "instance"))
QUEUES = [_config.RQ_QUEUE]
