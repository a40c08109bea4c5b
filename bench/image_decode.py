"""Image-decode mode: N heavy PNG uploads at once while /healthz is sampled every 10 ms.

```
python -m bench.image_decode [--app-dir DIR] [--json FILE] --uploads 4 --side 6300
```
(registered in bench/__main__.py: `python -m bench image-decode ...`, with `add_parser` and `run`.)

A gevent worker runs every request of its process on one OS thread: whatever a request does
without yielding (Pillow decoding a 40 MP PNG) stops all the others, /healthz included. The
bench signs one user in, then sends `--uploads` copies of a small PNG that decodes big (a
`--side` x `--side` 16-bit RGBA picture, 344 KB at 6300: it compresses a thousandfold) to
a 1:1 conversation with `POST /conversations/<cid>/messages` (file `image`, the CSRF token from
the chat page's meta tag), all at once, while /healthz is requested every `--interval` ms on a
fixed schedule. A health check's latency is counted from its scheduled time, so a stalled
server cannot hide behind a sampler that waits for it. The report gives /healthz p50/p95/p99/max
before the uploads (`--baseline` s) and while they run, each upload's status and time, and the
server tree's CPU and peak RSS.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import struct
import sys
import time
import zlib

import httpx

from . import servers
from .clients import CSRF_RE
from .load import settle
from .seed import PASSWORD, make_app, webchat_world
from .stats import TreeSampler, fmt_cpu, fmt_latency, latency_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def heavy_png(side: int) -> bytes:
    """Return a `side` x `side` 16-bit RGBA PNG: vertical stripes, a first row and then "Up" rows.

    Every row after the first repeats it (filter 2, all-zero differences), so deflate shrinks
    the 8 bytes a pixel about a thousandfold, and the decoder still inflates and unpacks all of it.
    """
    path = os.path.join(servers.LOG_DIR, f"heavy-{side}.png")
    if os.path.exists(path):
        with open(path, "rb") as fh:
            return fh.read()
    first = bytearray(side * 8)
    for x in range(side):
        level = (x * 65535 // max(1, side - 1)).to_bytes(2, "big")
        first[x * 8:x * 8 + 8] = level + (65535 - int.from_bytes(level, "big")).to_bytes(2, "big") + b"\x80\x00\xff\xff"
    packer = zlib.compressobj(9)
    parts = [packer.compress(b"\x00" + bytes(first))]
    up_row = b"\x02" + bytes(side * 8)
    for _ in range(side - 1):
        parts.append(packer.compress(up_row))
    parts.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)  # 16 bits, RGBA, no interlace
    data = PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
    os.makedirs(servers.LOG_DIR, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return data


async def _sign_in(client: httpx.AsyncClient, username: str, cid: int) -> str:
    """Sign in as a browser does and return the CSRF token of the chat page's meta tag."""
    page = await client.get("/auth/login")
    token = CSRF_RE.search(page.text).group(1)
    reply = await client.post("/auth/login", data={"username": username, "password": PASSWORD, "csrf_token": token})
    if reply.status_code != 303:
        raise RuntimeError(f"sign-in answered {reply.status_code}")
    chat = await client.get(f"/conversations/{cid}")
    return CSRF_RE.search(chat.text).group(1)


class HealthSampler:
    """GET /healthz every `interval` seconds on a fixed schedule; latency counts from the scheduled time."""

    def __init__(self, base_url: str, interval: float) -> None:
        self.client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(60.0),
                                        limits=httpx.Limits(max_connections=1000, keepalive_expiry=1.0))
        self.interval = interval
        self.samples: list[tuple[float, float, int]] = []  # (scheduled, latency s, status or 0)
        self.tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()

    async def _one(self, due: float) -> None:
        try:
            status = (await self.client.get("/healthz")).status_code
        except httpx.HTTPError:
            status = 0
        self.samples.append((due, time.perf_counter() - due, status))

    async def run(self) -> None:
        start = time.perf_counter()
        n = 0
        while not self._stop.is_set():
            due = start + n * self.interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self.tasks.append(asyncio.create_task(self._one(due)))
            n += 1

    async def stop(self, runner: asyncio.Task) -> None:
        """Stop scheduling, wait for the checks in flight, close the client."""
        self._stop.set()
        await runner
        await asyncio.gather(*self.tasks)
        await self.client.aclose()

    def window(self, since: float, until: float) -> list[tuple[float, float, int]]:
        return [s for s in self.samples if since <= s[0] < until]


async def _upload(client: httpx.AsyncClient, cid: int, token: str, data: bytes, n: int) -> dict:
    started = time.perf_counter()
    reply = await client.post(f"/conversations/{cid}/messages", headers={"X-CSRFToken": token},
                              data={"body": "", "client_id": f"bench-image-{os.getpid()}-{n}-{time.time_ns()}"},
                              files={"image": (f"heavy-{n}.png", data, "image/png")})
    return {"status": reply.status_code, "seconds": time.perf_counter() - started}


async def _measure(base_url: str, username: str, cid: int, data: bytes, args, server_pid: int) -> dict:
    client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(120.0),
                               limits=httpx.Limits(max_connections=args.uploads + 2))
    token = await _sign_in(client, username, cid)
    # One upload first, unmeasured: imports and first-use caches (Pillow's plugins, WebP) warm up.
    warm = await _upload(client, cid, token, data, -1)
    sampler = TreeSampler({"server": server_pid}, interval=0.05).start()
    health = HealthSampler(base_url, args.interval / 1000)
    health_task = asyncio.create_task(health.run())
    await asyncio.sleep(args.baseline)
    t_uploads = time.perf_counter()
    m_uploads = time.monotonic()
    uploads = await asyncio.gather(*(_upload(client, cid, token, data, n) for n in range(args.uploads)))
    t_done = time.perf_counter()
    m_done = time.monotonic()
    await asyncio.sleep(args.tail)
    await health.stop(health_task)
    sampler.stop()
    await client.aclose()

    before = health.window(0, t_uploads)
    during = health.window(t_uploads, t_done)
    result = {
        "uploads": args.uploads,
        "side": args.side,
        "png_bytes": len(data),
        "workers": args.workers,
        "warm_up_upload": warm,
        "upload_statuses": sorted(u["status"] for u in uploads),
        "upload": latency_summary([u["seconds"] for u in uploads]),
        "uploads_wall_s": t_done - t_uploads,
        "healthz_before": latency_summary([s[1] for s in before]),
        "healthz_during": latency_summary([s[1] for s in during]),
        "healthz_errors": sum(1 for s in health.samples if s[2] != 200),
        "server": sampler.summary("server", m_uploads, m_done),
        "server_rss_before_mb": sampler.summary("server", None, m_uploads)["rss_max_mb"],
        "server_rss_after_mb": sampler.samples["server"][-1].rss / 2**20 if sampler.samples["server"] else None,
    }
    print(f"\n== image decode: {args.uploads} uploads of a {args.side}x{args.side} 16-bit RGBA PNG "
          f"({len(data) / 1024:.0f} KB), {args.workers} worker(s) ==")
    print(f"  warm-up upload: HTTP {warm['status']} in {warm['seconds'] * 1000:.0f} ms")
    print(f"  uploads: HTTP {result['upload_statuses']}; each {fmt_latency(result['upload'])}; "
          f"all done in {result['uploads_wall_s']:.2f} s")
    print(f"  /healthz before the uploads: {fmt_latency(result['healthz_before'])}")
    print(f"  /healthz while they run:     {fmt_latency(result['healthz_during'])}")
    print(f"  /healthz errors (not 200): {result['healthz_errors']}")
    print("  " + fmt_cpu("server (gunicorn tree) during the uploads", result["server"]))
    print(f"  server RSS before the uploads {result['server_rss_before_mb']:.0f} MB, "
          f"at the end {result['server_rss_after_mb']:.0f} MB")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The mode's own options (the global ones, --app-dir, --json, --quiet-*, belong to bench)."""
    parser.add_argument("--uploads", type=int, default=4, help="uploads sent at once (default 4)")
    parser.add_argument("--side", type=int, default=6300,
                        help="the PNG's width and height (default 6300: 39.7 MP, under the 40 MP limit)")
    parser.add_argument("--interval", type=float, default=10, help="ms between /healthz requests (default 10)")
    parser.add_argument("--baseline", type=float, default=2, help="seconds of /healthz before the uploads (default 2)")
    parser.add_argument("--tail", type=float, default=0.5, help="seconds of /healthz after them (default 0.5)")
    # One process by default: a blocked worker's own sockets and keep-alive connections cannot
    # move to another process, but a sampler's new connections can, which hides the stall.
    parser.add_argument("--workers", type=int, default=1, help="gunicorn processes (WEB_CONCURRENCY, default 1)")
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--keep-db", action="store_true", help="keep the scratch database")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the mode as `python -m bench image-decode`."""
    parser = subparsers.add_parser("image-decode", help="heavy PNG uploads at once: /healthz latency meanwhile")
    add_arguments(parser)
    return parser


def run(args) -> dict:
    """Start a scratch database, Redis and gunicorn; measure; stop them."""
    data = heavy_png(args.side)
    port = servers.free_port()
    with servers.redis_for(args) as redis_url, \
            servers.scratch_database("webchat_bench_images", redis_url, keep=args.keep_db) as db_url:
        app = make_app(db_url, redis_url)
        world = webchat_world(app, 2, 1, 0, 0)
        server = servers.start_webchat(db_url, redis_url, port, args.workers)
        with servers.stopping(server):
            busy = settle(args)
            result = asyncio.run(_measure(server.url, world.users[0].username, world.directs[0].cid, data,
                                          args, server.pid))
    return dict(result, machine_busy_before=busy)


def main(argv: list[str] | None = None) -> int:
    """Run the mode on its own, with bench's global options, until bench/__main__.py registers it."""
    # Here, not at the top: bench/__main__.py imports this module to register the mode.
    from .__main__ import _clean, app_version

    parser = argparse.ArgumentParser(prog="python -m bench.image_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--quiet-below", type=float, default=60)
    parser.add_argument("--quiet-wait", type=float, default=180)
    parser.add_argument("--app-dir", help="measure the webchat tree in this directory instead of this working tree")
    add_arguments(parser)
    args = parser.parse_args(argv)
    servers.use_app_dir(args.app_dir)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    servers.raise_fd_limit()
    command = "python -m bench.image_decode " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"# {command}")
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}, app {app_version()}", flush=True)
    results = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_clean({"command": command, "app": app_version(), "results": results}), fh, indent=2,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
