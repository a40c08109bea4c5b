"""Purge mode: 1,000,000 expired messages on PostgreSQL, purged while messages are being sent.

1. A scratch database gets users, 1:1 conversations and a group through webchat's services, then
   the expired messages in one INSERT ... SELECT generate_series (valid conversation and sender
   rows, created 30+ days ago); half the conversations also get recent messages, so the purge
   has both kinds of last-message fix-up to do.
2. gunicorn serves the app; every user signs in and opens a socket.
3. A sender loop sends over HTTP at a fixed rate: a few seconds alone (baseline), then while
   `purge_expired_messages(days)` runs in a separate process (as the RQ worker would run it).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

from sqlalchemy import text

from . import servers
from .clients import WebchatTarget
from .load import Plan, Run, settle
from .seed import make_app, webchat_world
from .stats import PgActivitySampler, TreeSampler, fmt_cpu, fmt_latency, latency_summary


def insert_expired(app, world, count: int, recent_per_conversation: int) -> dict:
    """Insert `count` messages older than 30 days (and a few recent ones); return timings."""
    from webchat.extensions import db

    from .seed import recount_unread_of_app

    convs = world.directs + world.groups
    cids = [c.cid for c in convs]
    senders = [world.users[c.members[0]].uid for c in convs]
    timings = {}
    with app.app_context():
        started = time.monotonic()
        db.session.execute(text("""
            INSERT INTO messages (conversation_id, sender_id, kind, body, created_at)
            SELECT (:cids)[1 + g % :n], (:senders)[1 + g % :n], 'text',
                   'An old message, number ' || g, now() - interval '30 days' - make_interval(secs => g / 100.0)
            FROM generate_series(1, :count) AS g
        """), {"cids": cids, "senders": senders, "n": len(cids), "count": count})
        if recent_per_conversation:
            db.session.execute(text("""
                INSERT INTO messages (conversation_id, sender_id, kind, body, created_at)
                SELECT (:cids)[1 + 2 * (g % ((:n + 1) / 2))], (:senders)[1 + 2 * (g % ((:n + 1) / 2))], 'text',
                       'A recent message, number ' || g, now() - interval '1 day' + make_interval(secs => g)
                FROM generate_series(1, :count) AS g
            """), {"cids": cids, "senders": senders, "n": len(cids),
                   "count": recent_per_conversation * ((len(cids) + 1) // 2)})
        db.session.execute(text("""
            UPDATE conversations c SET last_message_id = m.id, last_message_text = left(m.body, 200),
                   last_message_at = m.created_at
            FROM (SELECT DISTINCT ON (conversation_id) id, conversation_id, body, created_at
                  FROM messages ORDER BY conversation_id, id DESC) m
            WHERE m.conversation_id = c.id
        """))
        recount = recount_unread_of_app()
        if recount is not None:  # unread counters (since 2026-11-27)
            recount()  # the messages went in around the services
        db.session.commit()
        timings["insert_s"] = time.monotonic() - started
        started = time.monotonic()
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE messages"))
            conn.execute(text("VACUUM ANALYZE conversations"))
        timings["vacuum_analyze_s"] = time.monotonic() - started
        timings["expired"] = db.session.scalar(text(
            "SELECT count(*) FROM messages WHERE created_at < now() - interval '7 days'"))
        timings["total_messages"] = db.session.scalar(text("SELECT count(*) FROM messages"))
        db.session.remove()
    return timings


def purge_worker(args) -> None:
    """Run purge_expired_messages once in an app context and print its result as JSON."""
    from webchat.services.retention import purge_expired_messages

    app = make_app(args.database_url, args.redis_url)
    with app.app_context():
        started_at = time.time()  # wall clock: the bench maps it onto its own timeline
        if args.variant == "prototype":
            from .purge_prototype import purge_one_statement

            result = purge_one_statement(args.days, args.batch_size or app.config["RETENTION_BATCH"])
        else:
            result = purge_expired_messages(args.days, args.batch_size, trigger="bench")
        ended_at = time.time()
    print(json.dumps(None if result is None else dict(vars(result), variant=args.variant, started_at=started_at,
                                                      ended_at=ended_at)))


async def _send_during_purge(run: Run, args, db_url: str, redis_url: str) -> dict:
    await run.setup()
    sampler = TreeSampler({"server": run.server_pid, "loadgen": os.getpid(), "postgres": 0, "system": 0}).start()
    run.sampler = sampler
    pg = PgActivitySampler(servers.PG_ADMIN_URL, servers.database_name(db_url)).start()
    stop = asyncio.Event()
    phases: dict[str, float] = {}
    tasks: list[asyncio.Task] = []

    async def sender() -> None:
        p_start = time.perf_counter()
        i = 0
        while not stop.is_set():
            due = p_start + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            conv, user, _via = run.pick(0.0)
            tasks.append(asyncio.create_task(run.send_one(conv, user, "http")))
            i += 1

    sending = asyncio.create_task(sender())
    phases["baseline_start"] = time.perf_counter()
    await asyncio.sleep(args.baseline)
    phases["purge_start"] = phases["process_start"] = time.perf_counter()
    argv = [sys.executable, "-m", "bench", "purge-worker", "--database-url", db_url, "--redis-url", redis_url,
            "--days", str(args.days)]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    argv += ["--variant", args.variant]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=servers.ROOT, env=servers.app_env(db_url, redis_url),
                                                stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    sampler_purge = TreeSampler({"purge": proc.pid}).start()
    recording = None
    if args.profile:
        from .profiling import Recording

        recording = Recording([proc.pid], args.timeout, os.path.join(servers.LOG_DIR, "profiles"), "purge")
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=args.timeout)
    except asyncio.TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        run.recorder.errors[f"purge did not finish in {args.timeout}s"] += 1
    phases["purge_end"] = phases["process_end"] = time.perf_counter()
    sampler_purge.stop()
    stop.set()
    await sending
    await asyncio.gather(*tasks)
    await run.drain(5)
    sampler.stop()
    pg.stop()
    purge = json.loads(out.decode().strip().splitlines()[-1]) if proc.returncode == 0 else \
        {"error": err.decode()[-2000:]}
    if purge and "started_at" in purge:
        # "During" is the purge itself, not the worker process's start-up (imports, app creation).
        offset = time.time() - time.perf_counter()
        phases["purge_start"] = purge.pop("started_at") - offset
        phases["purge_end"] = purge.pop("ended_at") - offset

    rec = run.recorder

    def window(values, sent_at, start, end):
        return [v for v, t in zip(values, sent_at) if start <= t < end]

    result = {
        "purge": purge,
        "purge_wall_s": phases["process_end"] - phases["process_start"],
        "rate": args.rate,
        "send_baseline": latency_summary(window(rec.send_latencies, rec.send_sent_at, phases["baseline_start"],
                                                phases["process_start"])),
        "send_during": latency_summary(window(rec.send_latencies, rec.send_sent_at, phases["purge_start"],
                                              phases["purge_end"])),
        "delivery_baseline": latency_summary(window(rec.latencies, rec.latency_sent_at,
                                                    phases["baseline_start"], phases["process_start"])),
        "delivery_during": latency_summary(window(rec.latencies, rec.latency_sent_at, phases["purge_start"],
                                                  phases["purge_end"])),
        "deliveries_lost": rec.lost(),
        "errors": dict(rec.errors),
        "purge_process": sampler_purge.summary("purge"),
        "pg_backends": pg.summary(),
    }
    for name in ("server", "postgres", "system"):
        result[name] = sampler.summary(name)
    print("\n== purge while sending ==")
    print(f"  purge: {purge}")
    print(f"  purge wall time seen by the bench: {result['purge_wall_s']:.1f}s (process start included)")
    print(f"  sending {args.rate:g} msg/s over HTTP")
    print("  (\"during\" = from the purge's start to its end inside the worker)")
    print(f"  send before purge:  {fmt_latency(result['send_baseline'])}")
    print(f"  send during purge:  {fmt_latency(result['send_during'])}")
    print(f"  delivery before:    {fmt_latency(result['delivery_baseline'])}")
    print(f"  delivery during:    {fmt_latency(result['delivery_during'])}")
    print(f"  deliveries lost {result['deliveries_lost']}  errors: {result['errors'] or 'none'}")
    print("  " + fmt_cpu("purge process", result["purge_process"]))
    print("  " + fmt_cpu("server", result["server"]))
    print("  " + fmt_cpu("postgres", result["postgres"]))
    print(f"  whole machine: CPU mean {result['system']['cpu_mean']:.0f}% (includes other people's work)")
    print("  app's PostgreSQL backends by state/wait (mean, max): " + ", ".join(
        f"{k} {v['mean']}/{v['max']}" for k, v in result["pg_backends"].items()))
    if recording is not None:
        from .profiling import summarise

        recording.wait()
        print(f"\n  -- py-spy: purge process ({', '.join(recording.paths)}) --")
        print(summarise(recording.paths))
    await run.teardown()
    return result


def run_purge(args) -> dict:
    plan = Plan(users=args.users, sockets_per_user=1, directs_per_user=2, groups=1, group_size=min(50, args.users),
                group_fraction=0.0, http_fraction=1.0, seed=args.seed)
    with servers.redis_for(args) as redis_url, \
            servers.scratch_database("webchat_bench_purge", redis_url, keep=args.keep_db) as db_url:
        app = make_app(db_url, redis_url)
        world = webchat_world(app, plan.users, plan.directs_per_user, plan.groups, plan.group_size)
        seeding = insert_expired(app, world, args.messages, args.recent)
        print(f"  inserted {seeding['expired']} expired messages ({seeding['total_messages']} in all) in "
              f"{seeding['insert_s']:.1f}s; VACUUM ANALYZE {seeding['vacuum_analyze_s']:.1f}s", flush=True)
        server = servers.start_webchat(db_url, redis_url, servers.free_port(), args.workers)
        with servers.stopping(server):
            run = Run(WebchatTarget(server.url), world, plan, server.pid)
            busy = settle(args)
            result = asyncio.run(_send_during_purge(run, args, db_url, redis_url))
            result["machine_busy_before"] = busy
        result["seeding"] = seeding
        return result
