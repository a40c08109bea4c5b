"""Pages mode: server time and SQL query count of the conversation list and the chat page.

Runs in-process with Flask's test client against PostgreSQL, so the time measured is the app's
own (routing, queries, rendering), with no network or load generator in it. Queries are counted
with a SQLAlchemy `before_cursor_execute` listener. Two viewers are measured in one database: a
small one (10 conversations) and a large one (500 conversations, 10,000 messages), so a query count
that grows with the list shows up as a difference.
"""
from __future__ import annotations

import os
import re
import time
from collections import Counter

from sqlalchemy import event, text

from . import servers
from .load import settle
from .seed import PASSWORD, make_app
from .stats import TreeSampler, percentile

CSRF_RE = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


def _seed_viewer(n_conversations: int, n_messages: int, busy_messages: int, group_every: int) -> dict:
    """Give a new viewer n conversations (1:1 and groups) holding n_messages; return ids (in app context)."""
    from webchat.extensions import db
    from webchat.models import User
    from webchat.services.conversations import create_group, find_or_create_direct

    from .seed import create_users, recount_unread_of_app

    n_groups = n_conversations // group_every
    n_directs = n_conversations - n_groups
    people = create_users(n_directs + 1)
    viewer = db.session.get(User, people[0].uid)
    others = [db.session.get(User, p.uid) for p in people[1:]]
    cids, partners = [], []
    for other in others:
        cids.append(find_or_create_direct(viewer, other).id)
        partners.append(other.id)
    for g in range(n_groups):
        trio = [others[(3 * g + k) % len(others)].id for k in range(3)]
        cids.append(create_group(viewer, f"Group {g}", trio).id)
        partners.append(trio[0])
    # One busy conversation (the one whose chat page is timed), the rest share the remainder.
    rest = n_messages - busy_messages
    db.session.execute(text("""
        INSERT INTO messages (conversation_id, sender_id, kind, body, created_at)
        SELECT CASE WHEN g <= :busy THEN (:cids)[1] ELSE (:cids)[1 + (g % :n)] END,
               CASE WHEN g % 2 = 0 THEN :viewer
                    ELSE (:partners)[CASE WHEN g <= :busy THEN 1 ELSE 1 + (g % :n) END] END,
               'text', 'Benchmark message number ' || g || ' with a little text in it',
               now() - make_interval(secs => (:total - g))
        FROM generate_series(1, :total) AS g
    """), {"busy": busy_messages, "cids": cids, "partners": partners, "n": len(cids), "viewer": viewer.id,
           "total": busy_messages + rest})
    db.session.execute(text("""
        UPDATE conversations c SET last_message_id = m.id, last_message_text = left(m.body, 200),
               last_message_at = m.created_at, last_message_image = false
        FROM (SELECT DISTINCT ON (conversation_id) id, conversation_id, body, created_at
              FROM messages WHERE conversation_id = ANY(:cids) ORDER BY conversation_id, id DESC) m
        WHERE m.conversation_id = c.id
    """), {"cids": cids})
    # Everything unread for the viewer (the counters are then recounted from the messages).
    db.session.execute(text("UPDATE unreads SET last_read_message_id = 0 WHERE user_id = :u"), {"u": viewer.id})
    recount = recount_unread_of_app()
    if recount is not None:  # the app keeps unread counters (since 2026-11-27)
        recount(cids)
    db.session.commit()
    return {"username": viewer.username, "busy_cid": cids[0], "group_cid": cids[-1] if n_groups else cids[0],
            "conversations": len(cids), "messages": n_messages}


def _sign_in(client, username: str) -> str:
    """Sign in through the login form; return the CSRF token for later POSTs."""
    token = CSRF_RE.search(client.get("/auth/login").get_data(as_text=True)).group(1)
    reply = client.post("/auth/login", data={"username": username, "password": PASSWORD, "csrf_token": token})
    assert reply.status_code == 303, reply.status_code
    return token


def _time_page(app, client, path: str, repeat: int, show_queries: bool = False, token: str | None = None,
               headers: dict | None = None) -> dict:
    """Time GET path (or, with a CSRF token, POST a new message to it) and count its SQL statements."""
    from webchat.extensions import db

    counts = []
    times = []
    with app.app_context():
        engine = db.engine
    current = {"n": 0, "sql": 0.0, "t": 0.0}
    statements: Counter = Counter()
    sql_times = []

    def count(_conn, _cursor, statement, *_args, **_kwargs):
        current["n"] += 1
        flat = " ".join(statement.split())
        statements[flat if len(flat) <= 200 else flat[:90] + " ... " + flat[-105:]] += 1
        current["t"] = time.perf_counter()

    def done(*_args, **_kwargs):
        current["sql"] += time.perf_counter() - current["t"]

    event.listen(engine, "before_cursor_execute", count)
    event.listen(engine, "after_cursor_execute", done)
    try:
        for i in range(repeat + 3):
            current["n"] = 0
            current["sql"] = 0.0
            started = time.perf_counter()
            if token is None:
                reply = client.get(path, headers=headers or {})
                expected = 200
            else:  # the send path, as a browser without htmx posts it
                reply = client.post(path, data={"body": f"Timed message {i}", "client_id": f"pages-{i}-{started}"},
                                    headers={"X-CSRFToken": token})
                expected = 303
            elapsed = time.perf_counter() - started
            assert reply.status_code == expected, (path, reply.status_code)
            if i >= 3:  # the first requests warm template and statement caches
                times.append(elapsed)
                counts.append(current["n"])
                sql_times.append(current["sql"])
            if i == 2 and show_queries:
                print(f"  -- {path}: {current['n']} queries")
                for statement, n in statements.most_common():
                    print(f"     {n:3d} x {statement}")
            statements.clear()
    finally:
        event.remove(engine, "before_cursor_execute", count)
        event.remove(engine, "after_cursor_execute", done)
    return {"path": path, "queries": sorted(set(counts)), "p50_ms": percentile(times, 50) * 1000,
            "sql_p50_ms": percentile(sql_times, 50) * 1000,
            "p95_ms": percentile(times, 95) * 1000, "max_ms": max(times) * 1000, "runs": len(times)}


def _profile(client, pages) -> None:
    """Print where the time of each page goes (cProfile, 5 requests, top functions by own time)."""
    import cProfile
    import io
    import pstats

    for name, path, headers in pages:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            client.get(path, headers=headers)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats(os.environ.get("PROFILE_SORT", "tottime"))
        stats.print_stats(int(os.environ.get("PROFILE_TOP", "18")))
        print(f"\n  -- profile of {name} ({path}), 5 requests, by own time --")
        print("\n".join("     " + line for line in out.getvalue().splitlines()[4:]))


def run_pages(args) -> dict:
    results = {}
    with servers.redis_for(args) as redis_url, \
            servers.scratch_database("webchat_bench_pages", redis_url, keep=args.keep_db) as db_url:
        app = make_app(db_url, redis_url)
        started = time.monotonic()
        with app.test_request_context("/"):
            from webchat.extensions import db

            small = _seed_viewer(10, 200, 100, 5)
            large = _seed_viewer(args.conversations, args.messages, args.busy_messages, 10)
            db.session.execute(text("ANALYZE"))
            db.session.commit()
            db.session.remove()
        print(f"  seeded in {time.monotonic() - started:.1f}s")
        results["machine_busy_before"] = settle(args)
        for label, viewer in (("small", small), ("large", large)):
            client = app.test_client()
            token = _sign_in(client, viewer["username"])
            # The chat page fetches its list with a request of its own (htmx, /conversations) since
            # 2026-11-27 round 7: "list (chat's)" is that request.
            pages = [("list", "/", {}), ("list (chat's)", "/conversations", {"HX-Request": "true"}),
                     ("chat (1:1, busy)", f"/conversations/{viewer['busy_cid']}", {}),
                     ("chat (group)", f"/conversations/{viewer['group_cid']}", {})]
            sampler = TreeSampler({"system": 0}).start()
            rows = {name: _time_page(app, client, path, args.repeat, args.show_queries, headers=headers)
                    for name, path, headers in pages}
            # The send path (POST a message to the group, no htmx), after the pages so they stay as seeded.
            rows["send (POST)"] = _time_page(app, client, f"/conversations/{viewer['group_cid']}/messages",
                                             args.repeat, args.show_queries, token=token)
            sampler.stop()
            if args.profile and label == "large":
                _profile(client, pages)
            machine = sampler.summary("system")["cpu_mean"]
            results[label] = {"viewer": viewer, "pages": rows, "machine_cpu_mean": machine}
            print(f"\n== pages, {viewer['conversations']} conversations / {viewer['messages']} messages "
                  f"(machine CPU during timing {machine:.0f}%, this process included) ==")
            for name, row in rows.items():
                print(f"  {name:18s} queries {row['queries']}  p50 {row['p50_ms']:.1f} ms  "
                      f"p95 {row['p95_ms']:.1f} ms  max {row['max_ms']:.1f} ms  ({row['runs']} runs; "
                      f"of which SQL p50 {row['sql_p50_ms']:.1f} ms)")
    return results
