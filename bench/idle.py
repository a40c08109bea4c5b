"""Idle mode: open N authenticated sockets that send nothing; report server memory per socket."""
from __future__ import annotations

import asyncio
import os
import time

from . import servers
from .load import settle
from .clients import Recorder, RelayTarget, WebchatTarget, close_sockets, open_sockets
from .seed import make_app, relay_world, webchat_world
from .stats import TreeSampler, fmt_cpu, tree_rss, tree_uss

WARMUP_SOCKETS_PER_WORKER = 10


async def _measure(target, world, per_user: int, server_pid: int, hold: float, workers: int) -> dict:
    recorder = Recorder()
    started = time.monotonic()
    await target.sign_in(world.users, 8, recorder)
    signed_in = time.monotonic() - started
    # Warm-up sockets first, so the baseline already holds imported code and first-use caches.
    warm_users = world.users[:max(1, WARMUP_SOCKETS_PER_WORKER * workers // per_user)]
    warm = await open_sockets(target, warm_users, per_user, recorder)
    await asyncio.sleep(2)
    base_rss, base_uss = tree_rss(server_pid), tree_uss(server_pid)
    rest = world.users[len(warm_users):]
    t0 = time.monotonic()
    sockets = await open_sockets(target, rest, per_user, recorder)
    opened_in = time.monotonic() - t0
    sampler = TreeSampler({"server": server_pid, "loadgen": os.getpid()}).start()
    await asyncio.sleep(hold)
    sampler.stop()
    rss, uss = tree_rss(server_pid), tree_uss(server_pid)
    still_open = sum(1 for s in sockets if s.open)
    n = len(sockets)
    result = {
        "target": target.name,
        "sockets_requested": len(rest) * per_user,
        "sockets_open": n,
        "still_open_after_hold": still_open,
        "open_seconds": opened_in,
        "sign_in_seconds": signed_in,
        "rss_before_mb": base_rss / 2**20,
        "rss_after_mb": rss / 2**20,
        "rss_per_socket_kb": (rss - base_rss) / n / 1024 if n else float("nan"),
        "uss_per_socket_kb": (uss - base_uss) / n / 1024 if n else float("nan"),
        "server_idle": sampler.summary("server"),
        "loadgen": sampler.summary("loadgen"),
        "errors": dict(recorder.errors),
    }
    print(f"\n== idle sockets [{target.name}] ==")
    print(f"  {n} sockets open of {result['sockets_requested']} requested ({len(world.users)} users, "
          f"{per_user} each) in {opened_in:.1f}s; {still_open} still open after {hold:g}s")
    print(f"  server RSS {result['rss_before_mb']:.1f} MB -> {result['rss_after_mb']:.1f} MB: "
          f"{result['rss_per_socket_kb']:.1f} KB per socket (USS {result['uss_per_socket_kb']:.1f} KB)")
    print("  " + fmt_cpu("server while idle", result["server_idle"]))
    print(f"  errors: {result['errors'] or 'none'}")
    await close_sockets(warm + sockets)
    await target.close()
    return result


def run_idle(args) -> dict:
    results = {}
    names = ["webchat", "relay"] if args.target == "both" else [args.target]
    per_user = args.sockets_per_user
    n_users = -(-args.sockets // per_user)
    extra_users = max(1, WARMUP_SOCKETS_PER_WORKER * args.workers // per_user)
    for name in names:
        port = servers.free_port()
        with servers.redis_for(args) as redis_url:
            if name == "relay":
                world = relay_world(n_users + extra_users, 0, 0, 0)
                server = servers.start_relay(redis_url if args.workers > 1 else None, port, args.workers)
                with servers.stopping(server):
                    busy = settle(args)
                    results[name] = asyncio.run(_measure(RelayTarget(server.url, world.users), world, per_user,
                                                         server.pid, args.hold, args.workers))
                    results[name]["machine_busy_before"] = busy
                continue
            with servers.scratch_database("webchat_bench_idle", redis_url, keep=args.keep_db) as db_url:
                world = webchat_world(make_app(db_url, redis_url), n_users + extra_users, 0, 0, 0)
                server = servers.start_webchat(db_url, redis_url, port, args.workers)
                with servers.stopping(server):
                    busy = settle(args)
                    results[name] = asyncio.run(_measure(WebchatTarget(server.url), world, per_user, server.pid,
                                                         args.hold, args.workers))
                    results[name]["machine_busy_before"] = busy
    if len(results) == 2:
        ratio = results["webchat"]["rss_per_socket_kb"] / results["relay"]["rss_per_socket_kb"]
        results["ratio"] = ratio
        print(f"\n== webchat / relay memory per socket: {results['webchat']['rss_per_socket_kb']:.1f} / "
              f"{results['relay']['rss_per_socket_kb']:.1f} KB = {ratio:.2f}x ==")
    return results
