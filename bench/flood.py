"""Flood mode: one socket floods the server (typing frames, then messages); what it does to everyone else.

For each phase a fresh gunicorn (the app's own config, `--workers` gevent processes) serves a scratch
database with two users in a 1:1 conversation. The peer opens a socket and joins the conversation;
the flooder opens one socket and sends, as fast as the connection takes them, typing frames or
`--message-bytes` messages for `--duration` seconds (or until the server closes the socket), then
closes it. Meanwhile `GET /healthz` is timed every `--probe-interval` seconds: before the flood,
during it, and after the socket closed until the server is idle again (its process tree under
`--idle-below` % CPU for a second) or `--after-max` seconds have passed. "busy after close" is
that wait: the work the flood left behind.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from contextlib import suppress
from dataclasses import dataclass, field

import httpx
import psycopg
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.typing import Origin

from . import servers
from .clients import Recorder, WebchatTarget
from .load import settle
from .seed import make_app, webchat_world
from .stats import TreeSampler, fmt_cpu, latency_summary

PHASES = ("typing", "messages")
ERROR_CODE_RE = re.compile(r'id="ws-error"[^>]*data-code="([^"]+)"')


def add_flood_args(parser) -> None:
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated: typing, messages")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of flooding per phase (default 3)")
    parser.add_argument("--message-bytes", type=int, default=4000,
                        help="characters in each flooded message (default 4000, the app's maximum)")
    parser.add_argument("--probe-interval", type=float, default=0.05, help="seconds between /healthz probes")
    parser.add_argument("--idle-below", type=float, default=25.0,
                        help="server CPU %% (100 = one core) under which it counts as idle (default 25)")
    parser.add_argument("--after-max", type=float, default=240.0,
                        help="stop waiting for the server to go idle after this many seconds (default 240)")
    parser.add_argument("--reconnect", action="store_true",
                        help="open a new socket each time the server closes one, until --duration is up")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis-url")
    parser.add_argument("--keep-db", action="store_true")


@dataclass
class Probe:
    """GET /healthz one after another, `interval` apart: (sent at, seconds, status) of each."""

    url: str
    interval: float
    samples: list[tuple[float, float, int]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = (await http.get(self.url + "/healthz")).status_code
                except httpx.HTTPError:
                    status = 0
                self.samples.append((t0, time.perf_counter() - t0, status))
                await asyncio.sleep(max(0.0, self.interval - (time.perf_counter() - t0)))

    def window(self, start: float, end: float) -> dict:
        rows = [s for s in self.samples if start <= s[0] < end]
        summary = latency_summary([s[1] for s in rows])
        summary["failed"] = sum(1 for s in rows if s[2] != 200)
        return summary


@dataclass
class Listener:
    """Read a socket to its end: frames, error codes, and the close code the server sent."""

    frames: int = 0
    typing: int = 0
    messages: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    close_code: int | None = None
    closed_at: float | None = None
    last_at: float = 0.0  # when the last typing or message frame arrived

    async def read(self, ws) -> None:
        try:
            async for frame in ws:
                self.frames += 1
                relayed = 'class="typing"' in frame, 'id="message-' in frame
                self.typing += relayed[0]
                self.messages += relayed[1]
                if any(relayed):
                    self.last_at = time.perf_counter()
                for code in ERROR_CODE_RE.findall(frame):
                    self.errors[code] = self.errors.get(code, 0) + 1
        except ConnectionClosed:
            pass
        self.closed_at = time.perf_counter()
        self.close_code = ws.close_code


def flood_frame(kind: str, cid: int, n: int, size: int) -> str:
    """The n-th frame of a flood: a typing hint, or a message of `size` characters."""
    if kind == "typing":
        return json.dumps({"type": "typing", "conversation_id": cid})
    body = f"{n} ".ljust(size, "x")  # `size` characters (at most the app's 4,000), numbered
    return json.dumps({"type": "message", "conversation_id": cid, "body": body, "client_id": f"flood-{n}"})


async def send_flood(ws, kind: str, cid: int, until: float, size: int, first: int) -> tuple[int, bool]:
    """Send frames as fast as the connection takes them until `until`; return (sent, closed by the server)."""
    sent = 0
    try:
        while time.perf_counter() < until:
            await ws.send(flood_frame(kind, cid, first + sent, size))
            sent += 1
            if sent % 200 == 0:
                await asyncio.sleep(0)  # let the probe and the readers run
    except ConnectionClosed:
        return sent, True
    except AttributeError:
        # websockets 15 can trip over its own abort() when the server closed the connection under a
        # send that was waiting for room; the connection is closed all the same.
        if ws.state is State.OPEN:
            raise
        return sent, True
    return sent, False


@dataclass
class Flood:
    """What the flooder's sockets saw: frames sent, sockets used, the server's closes and error frames."""

    sent: int = 0
    sockets: int = 0
    closed_by_server: int = 0
    close_codes: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    failed_connects: int = 0


async def flood(target, flooder, ws, kind: str, cid: int, args) -> Flood:
    """Flood on `ws`; with --reconnect, on a new socket each time the server closes one, for --duration s."""
    result, until = Flood(), time.perf_counter() + args.duration
    while ws is not None:
        seen = Listener()
        reader = asyncio.create_task(seen.read(ws))
        sent, closed = await send_flood(ws, kind, cid, until, args.message_bytes, result.sent)
        with suppress(AttributeError):  # as in send_flood
            await ws.close()
        await reader
        result.sent, result.sockets, result.closed_by_server = result.sent + sent, result.sockets + 1, \
            result.closed_by_server + closed
        if closed:
            result.close_codes[seen.close_code] = result.close_codes.get(seen.close_code, 0) + 1
        for code, n in seen.errors.items():
            result.errors[code] = result.errors.get(code, 0) + n
        ws = None
        while closed and args.reconnect and time.perf_counter() < until and ws is None:
            try:
                ws = await open_socket(target, flooder)
            except Exception:  # noqa: BLE001 - refused or reset: count it and try again
                result.failed_connects += 1
    return result


async def wait_idle(sampler: TreeSampler, since: float, below: float, limit: float) -> float | None:
    """Seconds from `since` until the server's CPU stays under `below` for a second; None if not within `limit`."""
    idle_from = None
    while time.perf_counter() - since < limit:
        await asyncio.sleep(0.5)
        rows = sampler.samples["server"]
        cpu = rows[-1].cpu_percent if rows else 0.0
        if cpu < below:
            idle_from = idle_from or time.perf_counter() - 0.5
            if time.perf_counter() - idle_from >= 1.0:
                return max(0.0, idle_from - since)
        else:
            idle_from = None
    return None


async def open_socket(target: WebchatTarget, user, **kwargs):
    url, headers = target.ws_request(user)
    return await connect(url, additional_headers=headers, origin=Origin(target.base_url), compression=None,
                         ping_interval=None, max_size=None, open_timeout=30, close_timeout=2, **kwargs)


async def run_phase(kind: str, server, world, args) -> dict:
    target = WebchatTarget(server.url)
    flooder, peer = world.users
    cid = world.directs[0].cid
    await target.sign_in(world.users, 2, Recorder())
    peer_ws, flood_ws = await open_socket(target, peer), await open_socket(target, flooder)
    await peer_ws.send(json.dumps({"type": "join", "conversation_id": cid}))
    peer_seen = Listener()
    peer_reader = asyncio.create_task(peer_seen.read(peer_ws))
    await asyncio.sleep(1.0)
    sampler = TreeSampler({"server": server.pid}).start()
    probe, stop = Probe(server.url, args.probe_interval), asyncio.Event()
    probing = asyncio.create_task(probe.run(stop))
    t_base = time.perf_counter()
    await asyncio.sleep(2.0)
    t_flood = time.perf_counter()
    flooded = await flood(target, flooder, flood_ws, kind, cid, args)
    t_closed = time.perf_counter()
    seconds = t_closed - t_flood
    busy_after = await wait_idle(sampler, t_closed, args.idle_below, args.after_max)
    t_idle = time.perf_counter()
    await asyncio.sleep(max(0.0, t_closed + 3.0 - t_idle))  # at least 3 s of "after"
    t_end = time.perf_counter()
    stop.set()
    await probing
    sampler.stop()
    await peer_ws.close()
    await peer_reader
    await target.close()
    mono = time.monotonic() - time.perf_counter()  # the sampler's clock is monotonic()
    return {
        "phase": kind,
        "frames_sent": flooded.sent,
        "flood_seconds": round(seconds, 2),
        "frames_per_second": round(flooded.sent / seconds) if seconds else None,
        "sockets": flooded.sockets,
        "closed_by_server": flooded.closed_by_server,
        "server_close_codes": flooded.close_codes,
        "failed_connects": flooded.failed_connects,
        "error_frames_to_flooder": flooded.errors,
        "peer_typing_frames": peer_seen.typing,
        "peer_message_frames": peer_seen.messages,
        "busy_after_close_s": None if busy_after is None else round(busy_after, 1),
        # Work the flood left behind reaches the peer after the close: its last relay says until when.
        "peer_last_relay_after_close_s": round(max(0.0, peer_seen.last_at - t_closed), 1),
        "healthz_before": probe.window(t_base, t_flood),
        "healthz_during": probe.window(t_flood, t_closed),
        "healthz_after": probe.window(t_closed, t_end),
        "server_cpu_during": sampler.summary("server", t_flood + mono, t_closed + mono),
        "server_cpu_after": sampler.summary("server", t_closed + mono, t_end + mono),
    }


def count_flooded(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT count(*) FROM messages WHERE client_id LIKE 'flood-%'").fetchone()[0]


def print_phase(result: dict, args) -> None:
    def ms(summary: dict) -> str:
        return (f"n={summary['count']} p50={summary['p50_ms']:.1f} ms p99={summary['p99_ms']:.1f} ms "
                f"max={summary['max_ms']:.1f} ms failed={summary['failed']}")

    busy = result["busy_after_close_s"]
    print(f"\n== flood: {result['phase']} ==")
    print(f"  sent {result['frames_sent']} frames in {result['flood_seconds']} s ({result['frames_per_second']}/s) "
          f"on {result['sockets']} socket(s); the server closed {result['closed_by_server']} "
          f"(codes {result['server_close_codes'] or '-'}), the client the rest; "
          f"failed connects {result['failed_connects']}")
    print(f"  error frames to the flooder: {result['error_frames_to_flooder'] or 'none'}; the peer got "
          f"{result['peer_typing_frames']} typing and {result['peer_message_frames']} message frames; "
          f"messages stored {result['messages_stored']}")
    print("  server busy after the socket closed: "
          + (f"{busy} s" if busy is not None else f"still busy after {args.after_max:g} s")
          + f"; the peer's last relay came {result['peer_last_relay_after_close_s']} s after the close")
    for name in ("before", "during", "after"):
        print(f"  /healthz {name:6}: {ms(result['healthz_' + name])}")
    print("  " + fmt_cpu("server during", result["server_cpu_during"]))
    print("  " + fmt_cpu("server after", result["server_cpu_after"]))


def run_flood(args) -> dict:
    results = {}
    with servers.redis_for(args) as redis_url, \
            servers.scratch_database("webchat_bench_flood", redis_url, keep=args.keep_db) as db_url:
        world = webchat_world(make_app(db_url, redis_url), 2, 1, 0, 0)
        for kind in [p.strip() for p in args.phases.split(",") if p.strip()]:
            if kind not in PHASES:
                raise SystemExit(f"unknown phase {kind!r} (choose from {', '.join(PHASES)})")
            stored_before = count_flooded(db_url)
            server = servers.start_webchat(db_url, redis_url, servers.free_port(), args.workers)
            with servers.stopping(server):
                busy = settle(args)
                result = asyncio.run(run_phase(kind, server, world, args))
            result["messages_stored"] = count_flooded(db_url) - stored_before
            result["machine_busy_before"] = busy
            print_phase(result, args)
            results[kind] = result
    return results
