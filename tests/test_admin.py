"""Admin pages: who may use them, what each action does, and what it writes to the audit log."""
from __future__ import annotations

import io
import re
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from sqlalchemy import func, select, update
from werkzeug.datastructures import FileStorage

from tests.conftest import image_bytes, login_client
from tests.support import drain
from webchat.extensions import db, redis_store
from webchat.models import AuditLog, Conversation, Membership, Message, RetentionRun, User
from webchat.services import admin as service


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def admin_id(app, users):
    """An admin called root (password 'password123'), besides alice, bob, carol and dave."""
    from webchat.services.accounts import register_user

    with app.app_context():
        return register_user("root", "password123", is_admin=True).id


@pytest.fixture
def admin(app, admin_id):
    """A test client signed in as the admin."""
    return login_client(app, "root")


@pytest.fixture
def group(app, users):
    """Alice's group "Team" with bob and carol, and two messages; returns its id."""
    from webchat.services.conversations import create_group
    from webchat.services.messages import send_message

    with app.test_request_context():
        alice, bob = db.session.get(User, users["alice"]), db.session.get(User, users["bob"])
        team = create_group(alice, "Team", [users["bob"], users["carol"]])
        send_message(alice, team, "secret plans")
        send_message(bob, team, "more secrets")
        return team.id


@pytest.fixture
def direct(app, users):
    """The 1:1 conversation of alice and bob with one message; returns its id."""
    from webchat.services.conversations import find_or_create_direct
    from webchat.services.messages import send_message

    with app.test_request_context():
        alice, bob = db.session.get(User, users["alice"]), db.session.get(User, users["bob"])
        conversation = find_or_create_direct(alice, bob)
        send_message(alice, conversation, "hi bob")
        return conversation.id


def audit_rows(app) -> list[tuple[str, str, str]]:
    with app.app_context():
        return [(a.actor_name, a.action, a.target)
                for a in db.session.scalars(select(AuditLog).order_by(AuditLog.id))]


def get_user(app, uid) -> User | None:
    with app.app_context():
        user = db.session.get(User, uid)
        if user is not None:
            db.session.expunge(user)
        return user


def sign_in(app, username):
    return app.test_client().post("/auth/login", data={"username": username, "password": "password123"})


# -- authorization ----------------------------------------------------------------------------

ROUTES = [
    ("GET", "/admin/", None),
    ("GET", "/admin/users?q=bo&page=1", None),
    ("GET", "/admin/users/{uid}", None),
    ("GET", "/admin/conversations?q=carol", None),
    ("GET", "/admin/conversations/{cid}", None),
    ("POST", "/admin/retention/run", {}),
    ("POST", "/admin/users/{uid}/disable", {}),
    ("POST", "/admin/users/{uid}/enable", {}),
    ("POST", "/admin/users/{uid}/admin", {"grant": "1"}),
    ("POST", "/admin/users/{uid}/delete", {}),
    ("POST", "/admin/conversations/{cid}/delete", {}),
]
ROUTE_IDS = [f"{m} {p.split('?')[0]}" for m, p, _ in ROUTES]


def call(client, method, path, data, users, cid):
    url = path.format(uid=users["bob"], cid=cid)
    if method == "GET":
        return client.get(url)
    return client.post(url, data=dict(data))


@pytest.mark.parametrize("method, path, data", ROUTES, ids=ROUTE_IDS)
def test_anonymous_is_sent_to_sign_in(app, client, users, group, method, path, data):
    response = call(client, method, path, data, users, group)
    assert response.status_code in (302, 303)
    assert response.headers["Location"].startswith("/auth/login?next=")


@pytest.mark.parametrize("method, path, data", ROUTES, ids=ROUTE_IDS)
def test_non_admin_gets_403_and_changes_nothing(app, users, group, method, path, data):
    client = login_client(app, "alice")
    response = call(client, method, path, data, users, group)
    assert response.status_code == 403
    bob = get_user(app, users["bob"])
    assert bob is not None and not bob.is_disabled and not bob.is_admin
    with app.app_context():
        assert db.session.get(Conversation, group) is not None
        assert Queue(app.config["RQ_QUEUE"], connection=redis_store.client).count == 0
    assert audit_rows(app) == []


@pytest.mark.parametrize("method, path, data", ROUTES, ids=ROUTE_IDS)
def test_admin_may_use_every_route(app, admin, users, group, method, path, data):
    response = call(admin, method, path, data, users, group)
    assert response.status_code == (200 if method == "GET" else 303)


def test_admin_link_shown_to_admins_only(app, admin, users):
    assert 'id="nav-admin"' in admin.get("/").get_data(as_text=True)
    assert 'id="nav-admin"' not in login_client(app, "alice").get("/").get_data(as_text=True)


POSTS = [(p, d) for m, p, d in ROUTES if m == "POST"]


@pytest.mark.parametrize("path, data", POSTS, ids=[p for p, _ in POSTS])
def test_post_without_csrf_token_is_refused(app, admin, users, group, path, data):
    response = admin.post(path.format(uid=users["bob"], cid=group), data=dict(data), csrf=False)
    assert response.status_code == 400
    assert get_user(app, users["bob"]) is not None
    assert audit_rows(app) == []


UNKNOWN = [
    ("GET", "/admin/users/999999", None),
    ("GET", "/admin/conversations/999999", None),
    ("GET", "/admin/users/not-a-number", None),
    ("POST", "/admin/users/999999/disable", {}),
    ("POST", "/admin/users/999999/enable", {}),
    ("POST", "/admin/users/999999/admin", {"grant": "1"}),
    ("POST", "/admin/users/999999/delete", {}),
    ("POST", "/admin/conversations/999999/delete", {}),
]


@pytest.mark.parametrize("method, path, data", UNKNOWN, ids=[f"{m} {p}" for m, p, _ in UNKNOWN])
def test_unknown_ids_are_404(app, admin, method, path, data):
    response = admin.get(path) if method == "GET" else admin.post(path, data=dict(data))
    assert response.status_code == 404
    assert audit_rows(app) == []


# -- users ------------------------------------------------------------------------------------

def test_disabled_user_cannot_sign_in_and_is_signed_out(app, admin, users, admin_id):
    bob = login_client(app, "bob")
    response = admin.post(f"/admin/users/{users['bob']}/disable")
    assert response.status_code == 303
    assert response.headers["Location"] == f"/admin/users/{users['bob']}"
    assert get_user(app, users["bob"]).is_disabled
    assert sign_in(app, "bob").status_code == 401
    # The session bob already had no longer works either.
    assert bob.get("/").headers["Location"].startswith("/auth/login")
    assert audit_rows(app) == [("root", "disable_user", f"user {users['bob']} (bob)")]
    assert "disabled" in admin.get(f"/admin/users/{users['bob']}").get_data(as_text=True)


def test_disable_publishes_a_close_for_the_users_sockets(app, admin, users):
    pubsub = redis_store_client(app).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events_channel(app))
    try:
        admin.post(f"/admin/users/{users['bob']}/disable")
        events = drain(pubsub)
    finally:
        pubsub.close()
    assert {"type": "close_user", "user_id": users["bob"], "code": 1008} in events


def test_enable_lets_the_user_sign_in_again(app, admin, users):
    admin.post(f"/admin/users/{users['bob']}/disable")
    response = admin.post(f"/admin/users/{users['bob']}/enable")
    assert response.status_code == 303
    assert not get_user(app, users["bob"]).is_disabled
    assert sign_in(app, "bob").status_code == 303
    assert [a for _, a, _ in audit_rows(app)] == ["disable_user", "enable_user"]


def test_disable_from_the_list_returns_to_the_list(app, admin, users):
    response = admin.post(f"/admin/users/{users['bob']}/disable", data={"next": "/admin/users?q=bo&page=1"})
    assert response.headers["Location"] == "/admin/users?q=bo&page=1"
    # Only admin pages of this site: anything else falls back to the user's page.
    response = admin.post(f"/admin/users/{users['bob']}/enable", data={"next": "https://evil.example/admin/"})
    assert response.headers["Location"] == f"/admin/users/{users['bob']}"


def test_delete_user_hands_groups_to_the_longest_standing_member(app, admin, users, group, direct):
    with app.app_context():
        # carol joined before bob, so she is the longest-standing member after alice.
        db.session.execute(update(Membership).where(Membership.conversation_id == group,
                                                    Membership.user_id == users["carol"])
                           .values(joined_at=datetime(2020, 1, 1, tzinfo=timezone.utc)))
        db.session.commit()
    pubsub = redis_store_client(app).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events_channel(app))
    try:
        response = admin.post(f"/admin/users/{users['alice']}/delete")
        events = drain(pubsub)
    finally:
        pubsub.close()
    assert response.status_code == 303
    # Her sockets close, and the people who knew her get fresh lists.
    assert {"type": "close_user", "user_id": users["alice"], "code": 1008} in events
    refresh = [e for e in events if e["type"] == "refresh"]
    assert refresh and sorted(refresh[0]["user_ids"]) == sorted([users["bob"], users["carol"]])
    assert response.headers["Location"] == "/admin/users"
    with app.app_context():
        assert db.session.get(User, users["alice"]) is None
        # Her 1:1 conversation is gone with its messages; the group stays, without her messages.
        assert db.session.get(Conversation, direct) is None
        assert db.session.scalar(select(func.count()).select_from(Message).where(
            Message.conversation_id == direct)) == 0
        team = db.session.get(Conversation, group)
        assert team is not None and team.owner_id == users["carol"]
        assert db.session.get(Membership, (group, users["carol"])).role == "owner"
        assert db.session.get(Membership, (group, users["alice"])) is None
        bodies = db.session.scalars(select(Message.body).where(Message.conversation_id == group,
                                                               Message.kind == "text")).all()
        assert bodies == ["more secrets"]
    assert audit_rows(app) == [("root", "delete_user", f"user {users['alice']} (alice)")]
    assert sign_in(app, "alice").status_code == 401


def test_grant_and_revoke_admin(app, admin, users):
    response = admin.post(f"/admin/users/{users['bob']}/admin", data={"grant": "1"})
    assert response.status_code == 303
    bob = login_client(app, "bob")
    assert bob.get("/admin/").status_code == 200
    admin.post(f"/admin/users/{users['bob']}/admin", data={"grant": "0"})
    assert bob.get("/admin/").status_code == 403
    assert [a for _, a, _ in audit_rows(app)] == ["grant_admin", "revoke_admin"]


@pytest.mark.parametrize("grant", ["", "2", "yes"])
def test_admin_flag_needs_one_or_zero(app, admin, users, grant):
    response = admin.post(f"/admin/users/{users['bob']}/admin", data={"grant": grant})
    assert response.status_code == 422
    assert "grant=1 or grant=0" in response.get_data(as_text=True)
    assert not get_user(app, users["bob"]).is_admin


@pytest.mark.parametrize("action, data", [("disable", {}), ("delete", {}), ("admin", {"grant": "0"})])
def test_last_admin_cannot_lock_themself_out(app, admin, admin_id, action, data):
    response = admin.post(f"/admin/users/{admin_id}/{action}", data=data)
    assert response.status_code == 409
    assert "only active admin" in response.get_data(as_text=True)
    root = get_user(app, admin_id)
    assert root is not None and root.is_admin and not root.is_disabled
    assert audit_rows(app) == []
    assert admin.get("/admin/").status_code == 200


def test_last_admin_refusal_counts_only_active_admins(app, admin, users, admin_id):
    admin.post(f"/admin/users/{users['bob']}/admin", data={"grant": "1"})
    admin.post(f"/admin/users/{users['bob']}/disable")
    # bob is an admin but disabled: root is still the only one who can sign in.
    assert admin.post(f"/admin/users/{admin_id}/admin", data={"grant": "0"}).status_code == 409


def test_an_admin_may_step_down_when_another_remains(app, admin, users, admin_id):
    admin.post(f"/admin/users/{users['bob']}/admin", data={"grant": "1"})
    assert admin.post(f"/admin/users/{admin_id}/admin", data={"grant": "0"}).status_code == 303
    assert admin.get("/admin/").status_code == 403
    bob = login_client(app, "bob")
    # Now bob is the last one, and the rule protects him in turn.
    assert bob.post(f"/admin/users/{users['bob']}/disable").status_code == 409


def test_user_search_and_pages(app, admin, users):
    with app.app_context():
        db.session.add_all([User(username=f"user{i:02d}", name=f"Person {i}", password_hash="x")
                            for i in range(30)])
        db.session.commit()
    first = admin.get("/admin/users?q=USER").get_data(as_text=True)
    assert "30 users" in first and "Page 1 of 2" in first
    assert "user00" in first and "user24" in first and "user25" not in first
    second = admin.get("/admin/users?q=user&page=2").get_data(as_text=True)
    assert "user25" in second and "user29" in second and "user24" not in second
    # Nicknames match too, and a bad page number falls back instead of failing.
    by_name = admin.get("/admin/users?q=person%201&page=abc")
    assert by_name.status_code == 200
    assert "user01" in by_name.get_data(as_text=True) and "alice" not in by_name.get_data(as_text=True)
    assert "No users match" in admin.get("/admin/users?q=%25_").get_data(as_text=True)


def test_user_page_shows_counts_and_last_seen(app, admin, users, group, direct):
    login_client(app, "bob")
    page = admin.get(f"/admin/users/{users['bob']}").get_data(as_text=True)
    assert '<dd id="user-conversation-count">2' in page
    assert "1:1: 1 · groups: 1" in page
    assert '<dd id="user-messages-sent">1</dd>' in page
    assert '<dd id="user-last-seen"><time datetime=' in page
    assert f'href="/admin/conversations/{group}"' in page and f'href="/admin/conversations/{direct}"' in page
    never = admin.get(f"/admin/users/{users['dave']}").get_data(as_text=True)
    assert '<dd id="user-last-seen"><span class="muted">never</span>' in never


# -- conversations ----------------------------------------------------------------------------

def test_conversation_search_by_member(app, admin, users, group, direct):
    page = admin.get("/admin/conversations?q=carol").get_data(as_text=True)
    assert f'id="admin-conversation-row-{group}"' in page
    assert f'id="admin-conversation-row-{direct}"' not in page
    both = admin.get("/admin/conversations?q=ALICE").get_data(as_text=True)
    assert f'id="admin-conversation-row-{group}"' in both and f'id="admin-conversation-row-{direct}"' in both
    assert "alice ↔ bob" in both
    by_name = admin.get("/admin/conversations?q=tea").get_data(as_text=True)
    assert f'id="admin-conversation-row-{group}"' in by_name and "1 conversation" in by_name


def test_conversation_pages(app, admin, users):
    with app.app_context():
        db.session.add_all([Conversation(is_group=True, name=f"room {i:02d}") for i in range(27)])
        db.session.commit()
    first = admin.get("/admin/conversations").get_data(as_text=True)
    assert "27 conversations" in first and "Page 1 of 2" in first
    assert first.count('id="admin-conversation-row-') == 25
    second = admin.get("/admin/conversations?page=2").get_data(as_text=True)
    assert second.count('id="admin-conversation-row-') == 2
    # Past the end shows the last page rather than an empty one.
    assert admin.get("/admin/conversations?page=99").get_data(as_text=True).count('id="admin-conversation-row-') == 2


def test_conversation_page_shows_members_and_count_not_content(app, admin, users, group):
    page = admin.get(f"/admin/conversations/{group}").get_data(as_text=True)
    assert '<dd id="admin-member-count">3</dd>' in page
    assert '<dd id="admin-message-count">2</dd>' in page
    for name in ("alice", "bob", "carol"):
        assert f'id="admin-member-{users[name]}"' in page
    assert "owner" in page
    assert "secret plans" not in page and "more secrets" not in page
    assert "never what is said" in page


def test_delete_conversation_removes_it_and_tells_members(app, admin, users, group):
    with app.test_request_context():
        from webchat.services.conversations import update_group

        alice = db.session.get(User, users["alice"])
        team = db.session.get(Conversation, group)
        update_group(alice, team, image=FileStorage(io.BytesIO(image_bytes()), "g.png", content_type="image/png"))
    pubsub = redis_store_client(app).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events_channel(app))
    try:
        response = admin.post(f"/admin/conversations/{group}/delete")
        events = drain(pubsub)
    finally:
        pubsub.close()
    assert response.status_code == 303
    assert response.headers["Location"] == "/admin/conversations"
    with app.app_context():
        assert db.session.get(Conversation, group) is None
        assert db.session.scalar(select(func.count()).select_from(Message).where(
            Message.conversation_id == group)) == 0
        assert db.session.scalar(select(func.count()).select_from(Membership).where(
            Membership.conversation_id == group)) == 0
        assert service.dashboard().images == 0
    removed = [e for e in events if e["type"] == "removed"]
    assert removed and removed[0]["conversation_id"] == group
    assert sorted(removed[0]["user_ids"]) == sorted([users["alice"], users["bob"], users["carol"]])
    assert audit_rows(app) == [("root", "delete_conversation", f"group {group} (Team)")]
    # The members' own view of it is gone.
    assert login_client(app, "bob").get(f"/conversations/{group}").status_code == 404


# -- dashboard --------------------------------------------------------------------------------

def test_dashboard_counts(app, admin, users, group, direct):
    with app.test_request_context():
        from webchat.services.messages import send_message

        alice = db.session.get(User, users["alice"])
        team = db.session.get(Conversation, group)
        send_message(alice, team, "", FileStorage(io.BytesIO(image_bytes()), "p.png", content_type="image/png"))
        old = Message(conversation_id=group, sender_id=users["bob"], body="from last week",
                      created_at=datetime.now(timezone.utc) - timedelta(days=3))
        db.session.add(old)
        db.session.commit()
        board = service.dashboard()
    assert board.users_total == 5 and board.admins == 1 and board.users_disabled == 0
    assert board.users_active_today == 1  # only root has signed in
    assert board.conversations_direct == 1 and board.conversations_group == 1
    assert board.messages_total == 5 and board.messages_today == 4
    assert board.images == 1 and board.image_bytes > 0
    page = admin.get("/admin/").get_data(as_text=True)
    assert '<div class="stat" id="stat-messages-total"><b>5</b>' in page
    assert '<div class="stat" id="stat-groups"><b>1</b> group chat<' in page  # one of each: singular
    assert '<div class="stat" id="stat-direct"><b>1</b> 1:1 conversation<' in page
    assert "1 admin<" in page and "1 admins" not in page
    assert re.search(r'id="stat-storage"><b>[\d.,]+ (bytes|kB)</b>\s*of images \(1 file\)', page)


@pytest.mark.parametrize("size, text", [(0, "0 bytes"), (1, "1 byte"), (999, "999 bytes"), (1000, "1 kB"),
                                        (999_949, "999.9 kB"), (999_950, "1 MB"), (1_234_567, "1.2 MB"), (5 * 10**12, "5 TB"), (7 * 10**15, "7,000 TB")])
def test_sizes_read_as_people_write_them(app, size, text):
    from webchat.templating import file_size

    with app.test_request_context():
        assert file_size(size) == text


def test_the_dashboard_in_chinese_has_no_english_left_in_its_figures(app, admin, group):
    with app.app_context():
        db.session.add(RetentionRun(days=7, messages_deleted=1, images_deleted=0, trigger="admin"))
        db.session.commit()
    page = admin.get("/admin/?lang=zh").get_data(as_text=True)
    figures = page[page.index("<h1>", page.index('id="admin-stats"')):page.index('id="retention-next-run"')]
    assert "个群聊" in figures and "由管理员执行" in figures and "字节" in figures
    assert not re.search(r"\b(bytes?|Bytes|admin|admins|groups?|files?)\b", re.sub(r"<[^>]+>", " ", figures))


def test_dashboard_shows_retention_status(app, admin):
    with app.app_context():
        db.session.add(RetentionRun(days=7, messages_deleted=42, images_deleted=3, trigger="cron"))
        db.session.commit()
    page = admin.get("/admin/").get_data(as_text=True)
    assert '<dd id="retention-days">7 days</dd>' in page
    assert '<code id="retention-cron">0 * * * *</code>' in page
    assert "42 messages and 3 images deleted" in page
    assert '<dd id="retention-next-run"><time datetime=' in page


@pytest.mark.parametrize("cron, now, expected", [
    ("0 * * * *", datetime(2024, 5, 1, 10, 15, tzinfo=timezone.utc), datetime(2024, 5, 1, 11, 0, tzinfo=timezone.utc)),
    ("*/15 * * * *", datetime(2024, 5, 1, 10, 15, tzinfo=timezone.utc),
     datetime(2024, 5, 1, 10, 30, tzinfo=timezone.utc)),
    ("not a cron", datetime(2024, 5, 1, 10, 15, tzinfo=timezone.utc), None),
])
def test_next_retention_run_follows_the_cron_string(cron, now, expected):
    # Cron strings are read in local time; hourly and quarter-hourly schedules fire at the
    # same instants in every zone with whole-hour offsets, which is what this checks.
    assert service.next_retention_run(cron, now) == expected


def test_run_now_enqueues_the_purge(app, admin):
    response = admin.post("/admin/retention/run")
    assert response.status_code == 303
    assert response.headers["Location"] == "/admin/?queued=1"
    with app.app_context():
        queue = Queue(app.config["RQ_QUEUE"], connection=redis_store.client)
        assert queue.count == 1
        job = queue.jobs[0]
        assert job.func_name == "webchat.jobs.purge_expired_messages_job" and job.args == (None, "admin")
    assert [a for _, a, _ in audit_rows(app)] == ["run_retention"]
    page = admin.get("/admin/?queued=1").get_data(as_text=True)
    assert '<div class="stat" id="queue-queued"><b>1</b>' in page
    assert 'id="retention-queued"' in page


def test_dashboard_survives_redis_being_down(app, admin, monkeypatch):
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2,
                       retry=Retry(NoBackoff(), 0))
    monkeypatch.setitem(app.extensions, "redis", dead)
    page = admin.get("/admin/")
    assert page.status_code == 200
    assert 'id="queue-unavailable"' in page.get_data(as_text=True)
    assert '<div class="stat" id="stat-online"><b>–</b>' in page.get_data(as_text=True)
    refused = admin.post("/admin/retention/run")
    assert refused.status_code == 503
    assert "job queue is unavailable" in refused.get_data(as_text=True)


def test_audit_log_shows_the_newest_twenty(app, admin, users):
    with app.app_context():
        db.session.add_all([AuditLog(actor_id=None, actor_name="root", action="enable_user", target=f"user {i}")
                            for i in range(25)])
        db.session.commit()
    page = admin.get("/admin/").get_data(as_text=True)
    assert page.count('data-action="enable_user"') == 20
    assert "<td>user 24</td>" in page and "<td>user 4</td>" not in page


def test_htmx_gets_a_fragment(app, admin, users):
    response = admin.get("/admin/users", headers={"HX-Request": "true"})
    assert response.status_code == 200
    body = response.get_data(as_text=True)
    assert "<html" not in body and 'id="admin-users-table"' in body
    refused = admin.post("/admin/users/999999/disable", headers={"HX-Request": "true"})
    assert refused.status_code == 404 and refused.headers["HX-Retarget"] == "#flash"


@pytest.mark.parametrize("path, make", [
    ("/admin/users", lambda: [User(username=f"x{i:02d}", name="x", password_hash="x") for i in range(20)]),
    ("/admin/conversations", lambda: [Conversation(is_group=True, name=f"g{i}") for i in range(20)]),
    ("/admin/", lambda: [User(username=f"y{i:02d}", name="y", password_hash="x") for i in range(20)]),
])
def test_admin_pages_load_in_a_fixed_number_of_queries(app, admin, users, group, count_queries, path, make):
    with count_queries() as before:
        admin.get(path)
    with app.app_context():
        db.session.add_all(make())
        db.session.commit()
    with count_queries() as after:
        admin.get(path)
    assert after.count == before.count, after.statements


# -- live: a disabled user's open socket closes -----------------------------------------------

def redis_store_client(app) -> redis.Redis:
    return app.extensions["redis"]


def events_channel(app) -> str:
    with app.app_context():
        return redis_store.channel


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.processes
def test_disabling_a_user_closes_their_open_socket(app, users, admin_id, live_server):
    import websocket

    from tests.support import cookie_header, csrf_of, http_login
    bob = http_login(live_server.url, "bob")
    ws = websocket.create_connection(live_server.url.replace("http", "ws") + "/ws",
                                     header=["Cookie: " + cookie_header(bob)], origin=live_server.url, timeout=10)
    try:
        # A bad frame is answered from the socket's receive loop, so the hub holds the socket by
        # now; and once the server's listener is subscribed, the close event cannot be missed.
        ws.send("not json")
        assert "JSON" in ws.recv()
        client = redis_store_client(app)
        channel = events_channel(app)
        wait_for(lambda: dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) >= 1)
        root = http_login(live_server.url, "root")
        response = root.post(f"/admin/users/{users['bob']}/disable",
                             data={"csrf_token": csrf_of(root, "/admin/")})
        assert response.status_code == 303
        code = None
        while code is None:
            try:
                opcode, data = ws.recv_data(control_frame=True)
            except websocket.WebSocketConnectionClosedException:
                code = "closed"
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else "closed"
        assert code == 1008
        # And it cannot come back.
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(live_server.url.replace("http", "ws") + "/ws",
                                        header=["Cookie: " + cookie_header(bob)], origin=live_server.url,
                                        timeout=10)
    finally:
        ws.close()
