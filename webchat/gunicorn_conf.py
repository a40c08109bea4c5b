"""gunicorn settings for the Procfile's web process (gunicorn -c webchat/gunicorn_conf.py)."""
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# gevent: one process holds thousands of sockets (gunicorn 27 has no eventlet worker).
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "20000"))
timeout = 60
graceful_timeout = 10
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn 27's control socket has one default path per user: several webchat servers on one
# machine (tests, a second checkout) would take it from each other. Opt in with GUNICORN_CONTROL_SOCKET.
control_socket_disable = not os.environ.get("GUNICORN_CONTROL_SOCKET")
if not control_socket_disable:
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]


def post_worker_init(worker):
    """Set a worker up once the app is loaded.

    - The collector: what is loaded now (modules, the app, its extensions) lives as long as the
      process. Frozen, it is no longer walked by every full collection, which stops the whole
      worker: at 1,000 sockets a full collection took 120-140 ms without this and 16-40 ms with it
      (bench/results/gc-pauses-r8.txt).
    - Its sockets close with 1012 when it is told to stop, so browsers reconnect elsewhere.
    """
    import gc

    from webchat.realtime.hub import hub

    gc.collect()  # nothing that is garbage now is frozen with the rest
    gc.freeze()
    hub.watch_worker(worker)
