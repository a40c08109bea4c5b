"""Load mode: sockets per user, sends at a fixed rate (or as fast as deliveries allow), delivery latency.

Open loop (`load`): messages are sent on a fixed schedule whatever the server does; every socket of
every member of the conversation (the sender's other tabs included) should receive each one.
Closed loop (`saturate`): C senders each send, wait until every socket got it, and send again;
the completed rate is the sustained throughput, measured the same way for webchat and the relay.
"""
from __future__ import annotations

import asyncio
import gc
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

from . import servers
from .clients import BenchSocket, Recorder, RelayTarget, Target, WebchatTarget, close_sockets, open_sockets
from .seed import Topology, add_backlog, make_app, relay_world, webchat_world
from .profiling import Recording, summarise
from .stats import PgActivitySampler, TreeSampler, fmt_cpu, fmt_latency, latency_summary, process_tree, wait_for_quiet


@dataclass
class Plan:
    users: int
    sockets_per_user: int
    directs_per_user: int
    groups: int
    group_size: int
    group_fraction: float
    http_fraction: float
    seed: int
    profile: bool = False


def add_world_args(parser) -> None:
    parser.add_argument("--users", type=int, default=50, help="users (default 50)")
    parser.add_argument("--sockets-per-user", type=int, default=4, help="open sockets per user (default 4)")
    parser.add_argument("--directs-per-user", type=int, default=2, help="1:1 conversations per user (default 2)")
    parser.add_argument("--groups", type=int, default=2, help="groups (default 2)")
    parser.add_argument("--group-size", type=int, default=50, help="members per group (default 50)")
    parser.add_argument("--group-fraction", type=float, default=0.1,
                        help="share of messages sent to groups (default 0.1)")
    parser.add_argument("--http-fraction", type=float, default=0.5,
                        help="share of messages sent over HTTP, the rest over WebSocket (default 0.5)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn processes (WEB_CONCURRENCY, default 2)")
    parser.add_argument("--target", choices=["webchat", "relay", "relay-db", "relay-sql", "both", "all", "floors"],
                        default="webchat",
                        help="relay-db: the relay writing each message to PostgreSQL first; relay-sql: the relay "
                             "running webchat's send transaction on a webchat database; both: webchat and relay; "
                             "all: webchat, relay-db and relay; floors: webchat, relay-sql, relay-db and relay")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--backlog", type=int, default=0,
                        help="webchat: messages put in each group first, unread by all but its owner (default 0)")
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--keep-db", action="store_true", help="keep the scratch database")
    parser.add_argument("--profile", action="store_true",
                        help="sample the server workers and the load generator with py-spy during the run")


def plan_from(args) -> Plan:
    return Plan(args.users, args.sockets_per_user, args.directs_per_user, args.groups, args.group_size,
                args.group_fraction, args.http_fraction, args.seed, args.profile)


class Run:
    """One benchmark run against one server: sockets open, a recorder, a sampler."""

    def __init__(self, target: Target, world: Topology, plan: Plan, server_pid: int) -> None:
        self.target = target
        self.world = world
        self.plan = plan
        self.server_pid = server_pid
        self.recorder = Recorder()
        self.sockets: list[BenchSocket] = []
        self.by_user: dict[int, list[BenchSocket]] = {}
        self.rng = random.Random(plan.seed)
        self.seq = 0
        self.sampler: TreeSampler | None = None
        self.dbname: str | None = None
        self.pg = None

    async def setup(self) -> None:
        started = time.monotonic()
        await self.target.sign_in(self.world.users, 8, self.recorder)
        self.sockets = await open_sockets(self.target, self.world.users, self.plan.sockets_per_user, self.recorder)
        for sock in self.sockets:
            self.by_user.setdefault(sock.user, []).append(sock)
        await asyncio.sleep(1.0)  # let handshakes settle before timing anything
        print(f"  [{self.target.name}] {len(self.sockets)} sockets open for {len(self.world.users)} users "
              f"in {time.monotonic() - started:.1f}s", flush=True)

    async def teardown(self) -> None:
        await close_sockets(self.sockets)
        await self.target.close()

    def pick(self, group_fraction: float):
        groups = self.world.groups
        conv = self.rng.choice(groups) if groups and self.rng.random() < group_fraction else \
            self.rng.choice(self.world.directs)
        sender = self.world.users[self.rng.choice(conv.members)]
        via = "http" if self.rng.random() < self.plan.http_fraction else "ws"
        return conv, sender, via

    async def send_one(self, conv, sender, via, wait: bool = False):
        """Send one message and register the deliveries it should make; return its record or None."""
        self.seq += 1
        seq = self.seq
        text = f"zq{seq}z bench message {seq}"
        client_id = f"bench-{seq}"
        expected = sum(1 for m in conv.members for s in self.by_user.get(m, ()) if s.open)
        if via == "ws":
            own = [s for s in self.by_user.get(sender.index, ()) if s.open]
            if not own:
                via = "http"
        item = self.recorder.expect(seq, frozenset(conv.members), expected, wait=wait, group=conv.is_group)
        try:
            if via == "http":
                error = await self.target.send_http(sender, conv, text, client_id)
            else:
                await self.rng.choice(own).ws.send(self.target.ws_frame(sender, conv, text, client_id))
                error = None
        except Exception as exc:  # noqa: BLE001
            error = f"send {via} {type(exc).__name__}"
        self.recorder.send_latencies.append(time.perf_counter() - item.t0)
        self.recorder.send_sent_at.append(item.t0)
        if error:
            self.recorder.errors[error] += 1
            item.expected = 0
            if item.done is not None:
                item.done.set()
            return None
        item.acked = True
        return item

    def start_sampling(self, duration: float = 0, profile: bool = False) -> None:
        # A full collection over the recorder's growing lists can pause the event loop for tens of
        # milliseconds, which would show up as latency: no collections while measuring.
        gc.collect()
        gc.freeze()
        gc.disable()
        self.sampler = TreeSampler({"server": self.server_pid, "loadgen": os.getpid(), "postgres": 0,
                                    "system": 0}).start()
        self.pg = PgActivitySampler(servers.PG_ADMIN_URL, self.dbname).start() if self.dbname else None
        self.recordings = []
        if profile:
            workers = [p.pid for p in process_tree(self.server_pid)[1:]]
            out = os.path.join(servers.LOG_DIR, "profiles")
            self.recordings = [("server workers", Recording(workers, duration, out, f"{self.target.name}-server")),
                               ("load generator", Recording([os.getpid()], duration, out,
                                                            f"{self.target.name}-loadgen"))]

    def stop_sampling(self) -> None:
        self.sampler.stop()
        gc.enable()
        gc.unfreeze()

    def print_profiles(self) -> None:
        for label, recording in getattr(self, "recordings", []):
            recording.wait()
            print(f"\n  -- py-spy: {label} ({', '.join(recording.paths)}) --")
            print(summarise(recording.paths))

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.recorder.lost() > 0:
            await asyncio.sleep(0.1)

    def report(self, title: str, window: float, t_start: float, t_end: float, extra: dict) -> dict:
        rec = self.recorder
        acked = sum(1 for s in rec.sent.values() if s.acked)
        complete = sum(1 for s in rec.sent.values() if s.acked and s.received >= s.expected)
        expected = sum(s.expected for s in rec.sent.values())
        result = {
            "target": self.target.name,
            "sockets": len(self.sockets),
            "users": len(self.world.users),
            "window_s": window,
            "sent": len(rec.sent),
            "acked": acked,
            "achieved_rate": acked / window if window else math.nan,
            "fully_delivered": complete,
            "delivered_rate": complete / window if window else math.nan,
            "frames": rec.frames,
            "frame_bytes": rec.frame_bytes,
            "deliveries": len(rec.latencies),
            "deliveries_expected": expected,
            "deliveries_lost": rec.lost(),
            "delivery": latency_summary(rec.latencies),
            "delivery_direct": latency_summary(rec.by_kind[False]),
            "delivery_group": latency_summary(rec.by_kind[True]),
            "send": latency_summary(rec.send_latencies),
            "errors": dict(rec.errors),
            **extra,
        }
        for name in ("server", "loadgen", "postgres", "system"):
            result[name] = self.sampler.summary(name, t_start, t_end) if self.sampler else {}
        server_cpu = result["server"].get("cpu_mean", math.nan)
        # Server CPU time per fully delivered message: what one message costs the server.
        result["server_cpu_ms_per_message"] = (server_cpu / 100 * window * 1000 / complete) if complete else math.nan
        if self.pg is not None:
            self.pg.stop()
            result["pg_backends"] = self.pg.summary()
        print(f"\n== {title} [{self.target.name}] ==")
        print(f"  sockets {result['sockets']} ({result['users']} users)  window {window:.1f}s")
        for key, value in extra.items():
            print(f"  {key}: {value}")
        print(f"  sent {result['sent']}  acknowledged {acked}  achieved {result['achieved_rate']:.1f} msg/s  "
              f"fully delivered {complete} ({result['delivered_rate']:.1f} msg/s)")
        print(f"  deliveries {result['deliveries']}/{expected}  not arrived by the end {result['deliveries_lost']}  "
              f"(frames received {rec.frames}, {rec.frame_bytes / 2**20:.1f} MB)")
        print(f"  delivery latency: {fmt_latency(result['delivery'])}")
        if rec.by_kind[True]:
            print(f"    of 1:1 messages: {fmt_latency(result['delivery_direct'])}")
            print(f"    of group messages: {fmt_latency(result['delivery_group'])}")
        print(f"  send latency (HTTP reply / WS write): {fmt_latency(result['send'])}")
        print(f"  errors: {result['errors'] or 'none'}")
        for name, label in (("server", "server (gunicorn tree)"), ("loadgen", "load generator"),
                            ("postgres", "postgres (all backends)")):
            if result[name]:
                print("  " + fmt_cpu(label, result[name]))
        print(f"  server CPU per delivered message: {result['server_cpu_ms_per_message']:.1f} ms")
        if result["system"]:
            print(f"  whole machine: CPU mean {result['system']['cpu_mean']:.0f}% of {100 * (os.cpu_count() or 1)}% "
                  f"(includes other people's work on this box)")
        if result.get("pg_backends"):
            print("  app's PostgreSQL backends by state/wait (mean, max): " + ", ".join(
                f"{k} {v['mean']}/{v['max']}" for k, v in result["pg_backends"].items()))
        return result


async def open_loop(run: Run, rate: float, duration: float, drain: float) -> dict:
    """Send `rate` messages a second for `duration` seconds on a fixed schedule."""
    await run.setup()
    run.start_sampling(duration, run.plan.profile)
    total = int(rate * duration)
    tasks = []
    max_lag = 0.0
    t_start = time.monotonic()
    p_start = time.perf_counter()
    for i in range(total):
        due = p_start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            max_lag = max(max_lag, -delay)
        conv, sender, via = run.pick(run.plan.group_fraction)
        tasks.append(asyncio.create_task(run.send_one(conv, sender, via)))
    await asyncio.gather(*tasks)
    window = time.perf_counter() - p_start
    t_end = time.monotonic()
    await run.drain(drain)
    run.stop_sampling()
    result = run.report(f"open loop {rate:g} msg/s for {duration:g}s", window, t_start, t_end,
                        {"target_rate": rate, "schedule_lag_max_ms": round(max_lag * 1000, 1)})
    run.print_profiles()
    await run.teardown()
    return result


async def closed_loop(run: Run, concurrency: int, duration: float, group_fraction: float) -> dict:
    """Run `concurrency` senders that each wait for full delivery before the next send."""
    await run.setup()
    run.start_sampling(duration, run.plan.profile)
    stop_at = time.perf_counter() + duration
    timeouts = 0

    async def sender() -> None:
        nonlocal timeouts
        while time.perf_counter() < stop_at:
            conv, user, via = run.pick(group_fraction)
            item = await run.send_one(conv, user, via, wait=True)
            if item is None:
                continue
            try:
                await asyncio.wait_for(item.done.wait(), timeout=5)
            except asyncio.TimeoutError:
                timeouts += 1

    t_start = time.monotonic()
    p_start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    window = time.perf_counter() - p_start
    t_end = time.monotonic()
    run.stop_sampling()
    result = run.report(f"closed loop, {concurrency} senders for {duration:g}s", window, t_start, t_end,
                        {"concurrency": concurrency, "delivery_timeouts_5s": timeouts})
    run.print_profiles()
    await run.teardown()
    return result


def settle(args) -> float:
    """Wait for a quiet machine (other people's test suites share it); return its CPU use before the run."""
    busy = wait_for_quiet(getattr(args, "quiet_below", 1000), getattr(args, "quiet_wait", 0))
    print(f"  machine busy before the run: {busy:.0f}% (100 = one core)", flush=True)
    return busy


def _measure(server, target: Target, world: Topology, plan: Plan, args, runner, db_url: str | None = None) -> dict:
    """Run `runner` against a started server once the machine is quiet, then stop the server."""
    with servers.stopping(server):
        run = Run(target, world, plan, server.pid)
        run.dbname = servers.database_name(db_url) if db_url else None
        busy = settle(args)
        return dict(asyncio.run(runner(run)), machine_busy_before=busy)


def _start_relay(args, redis_url: str, port: int, db_url: str | None = None, webchat_sql: bool = False):
    # One process delivers by itself; several share sends through Redis, as webchat's do.
    return servers.start_relay(redis_url if args.workers > 1 else None, port, args.workers, db_url,
                               webchat_sql=webchat_sql)


def _run_target(name: str, args, runner) -> dict:
    """Start a fresh server (and database) for one target, run `runner(run)`, stop everything."""
    plan = plan_from(args)
    port = servers.free_port()
    with servers.redis_for(args) as redis_url:
        if name in ("relay", "relay-db"):
            world = relay_world(plan.users, plan.directs_per_user, plan.groups, plan.group_size)
            with servers.scratch_database("webchat_bench_relay", redis_url, keep=args.keep_db) \
                    if name == "relay-db" else nullcontext() as db_url:
                server = _start_relay(args, redis_url, port, db_url)
                return _measure(server, RelayTarget(server.url, world.users, name), world, plan, args, runner)
        with servers.scratch_database("webchat_bench", redis_url, keep=args.keep_db) as db_url:
            app = make_app(db_url, redis_url)
            world = webchat_world(app, plan.users, plan.directs_per_user, plan.groups, plan.group_size)
            if getattr(args, "backlog", 0):
                add_backlog(app, world, args.backlog)
            if name == "relay-sql":  # the relay, running webchat's send transaction on this database
                server = _start_relay(args, redis_url, port, db_url, webchat_sql=True)
                target: Target = RelayTarget(server.url, world.users, name)
            else:
                server = servers.start_webchat(db_url, redis_url, port, args.workers)
                target = WebchatTarget(server.url)
            return _measure(server, target, world, plan, args, runner, db_url)


def targets(args) -> list[str]:
    return {"both": ["webchat", "relay"], "all": ["webchat", "relay-db", "relay"],
            "floors": ["webchat", "relay-sql", "relay-db", "relay"]}.get(args.target, [args.target])


def run_load(args) -> dict:
    results = {}
    for name in targets(args):
        results[name] = _run_target(name, args, lambda run: open_loop(run, args.rate, args.duration, args.drain))
    _print_ratio(results, "delivered_rate")
    return results


def run_saturate(args) -> dict:
    results = {}
    for name in targets(args):
        results[name] = _run_target(
            name, args, lambda run: closed_loop(run, args.concurrency, args.duration, args.group_fraction))
    _print_ratio(results, "delivered_rate")
    return results


def _print_ratio(results: dict, key: str) -> None:
    if "relay" not in results or not results["relay"][key]:
        return
    for name in ("webchat", "relay-sql", "relay-db"):
        if name in results:
            ratio = results[name][key] / results["relay"][key]
            results["ratio" if name == "webchat" else "ratio_" + name.replace("-", "_")] = ratio
            print(f"\n== {name} / relay ({key}): {results[name][key]:.1f} / {results['relay'][key]:.1f} "
                  f"= {ratio:.0%} ==")
