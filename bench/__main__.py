"""python -m bench <mode> ...: run one benchmark and print (and optionally save) its figures.

Modes: load, saturate, idle, pages, purge, flood, image-decode (see bench/README.md); purge-worker is internal.
Each mode starts what it needs (a scratch PostgreSQL database, a private Redis, gunicorn) and
stops it afterwards.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time

from . import servers
from .flood import add_flood_args
from .image_decode import add_parser as add_image_decode_parser
from .load import add_world_args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--quiet-below", type=float, default=60,
                        help="before each measurement, wait until the machine's other work uses less than this "
                             "much CPU (100 = one core; default 60)")
    parser.add_argument("--quiet-wait", type=float, default=180, help="wait at most this long (default 180 s)")
    parser.add_argument("--app-dir", help="measure the webchat tree in this directory (e.g. a `git archive` "
                                          "snapshot) instead of this repository's working tree")
    modes = parser.add_subparsers(dest="mode", required=True)

    load = modes.add_parser("load", help="open loop: fixed send rate, delivery latency on every socket")
    add_world_args(load)
    load.add_argument("--rate", type=float, default=50, help="messages per second (default 50)")
    load.add_argument("--duration", type=float, default=20, help="seconds of sending (default 20)")
    load.add_argument("--drain", type=float, default=5, help="seconds to wait for late deliveries (default 5)")

    saturate = modes.add_parser("saturate", help="closed loop: sustained rate, for the ratio to the relay")
    add_world_args(saturate)
    saturate.set_defaults(group_fraction=0.0, target="both")
    saturate.add_argument("--concurrency", type=int, default=32, help="concurrent senders (default 32)")
    saturate.add_argument("--duration", type=float, default=15, help="seconds per target (default 15)")

    idle = modes.add_parser("idle", help="N idle authenticated sockets: server memory per socket")
    idle.add_argument("--sockets", type=int, default=2000, help="idle sockets (default 2000)")
    idle.add_argument("--sockets-per-user", type=int, default=10)
    idle.add_argument("--hold", type=float, default=10, help="seconds to hold them open (default 10)")
    idle.add_argument("--workers", type=int, default=2)
    idle.add_argument("--target", choices=["webchat", "relay", "both"], default="both")
    idle.add_argument("--redis-url")
    idle.add_argument("--keep-db", action="store_true")

    pages = modes.add_parser("pages", help="list and chat page: server time and SQL query count")
    pages.add_argument("--conversations", type=int, default=500)
    pages.add_argument("--messages", type=int, default=10_000)
    pages.add_argument("--busy-messages", type=int, default=1000,
                       help="messages in the conversation whose chat page is timed (default 1000)")
    pages.add_argument("--repeat", type=int, default=30)
    pages.add_argument("--show-queries", action="store_true", help="print each page's SQL statements once")
    pages.add_argument("--profile", action="store_true", help="print a cProfile of each page at the large size")
    pages.add_argument("--redis-url")
    pages.add_argument("--keep-db", action="store_true")

    purge = modes.add_parser("purge", help="purge 1,000,000 expired messages while sending")
    purge.add_argument("--messages", type=int, default=1_000_000)
    purge.add_argument("--recent", type=int, default=20, help="recent messages per even conversation")
    purge.add_argument("--users", type=int, default=20)
    purge.add_argument("--rate", type=float, default=20, help="messages per second sent meanwhile")
    purge.add_argument("--baseline", type=float, default=5, help="seconds of sending before the purge")
    purge.add_argument("--days", type=int, default=7)
    purge.add_argument("--batch-size", type=int, help="rows per batch (default: the app's RETENTION_BATCH)")
    purge.add_argument("--timeout", type=float, default=300)
    purge.add_argument("--profile", action="store_true", help="sample the purge process with py-spy")
    purge.add_argument("--variant", choices=["app", "prototype"], default="app",
                       help="app: webchat's purge_expired_messages (default); prototype: bench/purge_prototype.py, "
                            "a measured sketch of a recommended change")
    purge.add_argument("--workers", type=int, default=2)
    purge.add_argument("--seed", type=int, default=7)
    purge.add_argument("--redis-url")
    purge.add_argument("--keep-db", action="store_true")

    flood = modes.add_parser("flood", help="one socket floods typing frames, then messages: /healthz latency "
                                           "during and after, and how long the server stays busy after it closes")
    add_flood_args(flood)
    add_image_decode_parser(modes)

    worker = modes.add_parser("purge-worker", help=argparse.SUPPRESS)
    worker.add_argument("--database-url", required=True)
    worker.add_argument("--redis-url", required=True)
    worker.add_argument("--days", type=int, default=7)
    worker.add_argument("--batch-size", type=int)
    worker.add_argument("--variant", choices=["app", "prototype"], default="app")
    return parser


def app_version() -> str:
    """Describe the app code measured: the commit, and a hash of uncommitted changes to it (read-only git)."""
    import hashlib
    import subprocess

    if servers.APP_DIR != servers.ROOT:  # a snapshot: name it by its directory and a hash of its files
        digest = hashlib.sha1()
        for base in ("webchat", "templates", "migrations"):
            for folder, _dirs, files in sorted(os.walk(os.path.join(servers.APP_DIR, base))):
                for name in sorted(files):
                    if name.endswith((".py", ".html")):
                        with open(os.path.join(folder, name), "rb") as fh:
                            digest.update(name.encode() + fh.read())
        return f"{servers.APP_DIR} (files {digest.hexdigest()[:8]})"

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=servers.ROOT, capture_output=True, text=True,
                                  timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    paths = ["webchat", "templates", "migrations", "wsgi.py"]
    diff = git("diff", "HEAD", "--", *paths)
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *paths)
    for path in untracked.split():
        try:
            with open(os.path.join(servers.ROOT, path), "rb") as fh:
                diff += path + hashlib.sha1(fh.read()).hexdigest()
        except OSError:
            pass
    return head + (f"+dirty:{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else "")


def _clean(value):
    """Make results JSON-safe (NaN becomes null)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    servers.use_app_dir(args.app_dir)
    if args.mode == "purge-worker":
        from .purge import purge_worker

        purge_worker(args)
        return 0
    # create_app() configures logging at LOG_LEVEL; the bench's own output should stay readable.
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    limit = servers.raise_fd_limit()
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"# {command}")
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"open files {limit}, {time.strftime('%Y-%m-%d %H:%M:%S')}, app {app_version()}", flush=True)
    if args.mode == "load":
        from .load import run_load as run
    elif args.mode == "saturate":
        from .load import run_saturate as run
    elif args.mode == "idle":
        from .idle import run_idle as run
    elif args.mode == "pages":
        from .pages import run_pages as run
    elif args.mode == "flood":
        from .flood import run_flood as run
    elif args.mode == "image-decode":
        from .image_decode import run
    else:
        from .purge import run_purge as run
    results = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_clean({"command": command, "cpus": os.cpu_count(), "app": app_version(),
                              "at": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}), fh, indent=2,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
