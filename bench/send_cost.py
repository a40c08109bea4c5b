"""python bench/send_cost.py: one HTTP send's server cost, in-process (no sockets, no load generator).

Flask's test client posts `--sends` messages to a 1:1 conversation as htmx does, on a scratch
PostgreSQL database (created, migrated and dropped here) and the Redis at `--redis-url`. With
`--group-size N` it sends to a group of N members instead, and `--backlog M` first puts M messages
in the conversation that nobody but the sender has read (bulk-inserted, so every other member has M
unread). It prints the wall time per send (best of `--repeat` rounds; the process is alone on the CPU while it runs) and
the SQL statements one send issues. Run it with the app on the path: `PYTHONPATH=. .venv/bin/python
bench/send_cost.py`; to measure another copy of the app, put that first instead:
`PYTHONPATH=/tmp/webchat-snap-<commit> .venv/bin/python bench/send_cost.py`.
"""
from __future__ import annotations

import argparse
import os
import re
import time
import uuid

import psycopg

PG_ADMIN = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sends", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--group-size", type=int, default=2, help="members; above 2 a group, else a 1:1")
    parser.add_argument("--backlog", type=int, default=0, help="messages unread by everyone but the sender")
    args = parser.parse_args()

    name = f"webchat_bench_send_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    os.environ["DATABASE_URL"] = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    os.environ["REDIS_URL"] = args.redis_url
    os.environ.setdefault("SECRET_KEY", uuid.uuid4().hex)  # a scratch app: any key
    try:
        run(args)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(args) -> None:
    import webchat
    from flask_migrate import upgrade
    from sqlalchemy import event, text

    from webchat.extensions import db
    from webchat.models import User
    from webchat.services import accounts
    from webchat.services import conversations as convs

    app = webchat.create_app()
    print(f"# app: {os.path.dirname(webchat.__file__)}")
    with app.app_context():
        upgrade()
        names = ["alice", "bob"] + [f"member{i}" for i in range(max(0, args.group_size - 2))]
        password_hash = accounts.hash_password("password123")
        users = [User(username=n, name=n.capitalize(), password_hash=password_hash) for n in names]
        db.session.add_all(users)
        db.session.commit()
        if args.group_size > 2:
            cid = convs.create_group(users[0], "Bench", [u.id for u in users[1:]]).id
        else:
            cid = convs.find_or_create_direct(*users).id
        if args.backlog:
            from seed import put_backlog  # bench/seed.py: this script's directory is on the path

            put_backlog(cid, users[0].id, args.backlog)
            db.session.commit()
            db.session.execute(text("ANALYZE"))
            db.session.commit()
        print(f"# conversation: {args.group_size} members, backlog {args.backlog} unread per member")
    app.config["SESSION_COOKIE_SECURE"] = False  # the test client speaks plain http
    client = app.test_client()

    def csrf(path: str) -> str:
        return re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)

    signed_in = client.post("/auth/login", data={"username": "alice", "password": "password123",
                                                  "csrf_token": csrf("/auth/login")})
    assert signed_in.status_code == 303, signed_in.status_code
    token = csrf(f"/conversations/{cid}")
    url, headers = f"/conversations/{cid}/messages", {"HX-Request": "true", "X-CSRFToken": token}

    def send(i: int) -> None:
        response = client.post(url, data={"body": f"message {i}"}, headers=headers)
        assert response.status_code == 201, response.status_code

    for i in range(50):  # warm up: compiled statements, prepared statements, pools
        send(i)
    statements: list[str] = []
    with app.app_context():
        engine = db.engine
    listener = lambda conn, cursor, statement, *rest: statements.append(statement)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    send(-1)
    event.remove(engine, "before_cursor_execute", listener)
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        for i in range(args.sends):
            send(i)
        best = min(best, (time.perf_counter() - start) / args.sends)
    print(f"wall time per send: {best * 1000:.2f} ms (best of {args.repeat} x {args.sends})")
    print(f"statements per send: {len(statements)}")
    for statement in statements:
        print("  " + " ".join(statement.split())[:110])


if __name__ == "__main__":
    main()
