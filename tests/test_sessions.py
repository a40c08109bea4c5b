"""Server-side sessions: every signed-in cookie names a row of user_sessions, and ending the row
ends the cookie for good (logout, revoking, "sign out other sessions", a password change, a disabled
or deleted account), "keep me signed in" included, whatever Redis knows."""
from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from tests.conftest import Client
from tests.support import drain
from webchat import create_app
from webchat.config import TestConfig
from webchat.extensions import db, redis_store
from webchat.models import User, UserSession, utcnow

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
PHONE = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/131.0.0.0 Mobile Safari/537.36")


def sign_in(app, username="alice", password="password123", remember=False, agent=FIREFOX) -> Client:
    """Return a new client signed in as username (with "keep me signed in" when remember)."""
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = agent
    data = {"username": username, "password": password}
    if remember:
        data["remember"] = "y"
    response = client.post("/auth/login", data=data)
    assert response.status_code == 303, response.get_data(as_text=True)
    return client


def copy_of(app, client: Client, cookies=("session", "remember_token")) -> Client:
    """Return another browser holding copies of these cookies of `client`."""
    other = app.test_client()
    for name in cookies:
        cookie = client.get_cookie(name)
        assert cookie is not None, name
        other.set_cookie(name, cookie.value)
    return other


def signed_out(client: Client) -> bool:
    """Say whether this browser is sent to sign in (and its remember cookie was deleted)."""
    response = client.get("/")
    return response.status_code == 303 and "/auth/login" in response.headers["Location"] \
        and client.get_cookie("remember_token") is None


def signed_in(client: Client) -> bool:
    return client.get("/").status_code == 200


def session_ids(app, username="alice") -> list[str]:
    with app.app_context():
        return db.session.scalars(select(UserSession.id).join(User, User.id == UserSession.user_id)
                                  .where(User.username == username).order_by(UserSession.created_at)).all()


def listen(app):
    """Subscribe to the app's events channel; returns (pubsub, drain) where drain() collects what came."""
    pubsub = app.extensions["redis"].pubsub(ignore_subscribe_messages=True)
    with app.app_context():
        pubsub.subscribe(redis_store.channel)

    return pubsub, lambda seconds=2.0: drain(pubsub, seconds)


# -- what the cookies carry ---------------------------------------------------------------------

def test_each_sign_in_gets_its_own_session_and_remember_cookie(app, users):
    first, second = sign_in(app, remember=True), sign_in(app, remember=True)
    assert first.get_cookie("remember_token").value != second.get_cookie("remember_token").value
    assert len(session_ids(app)) == 2
    with app.app_context():
        hashes = db.session.scalars(select(UserSession.token_hash)).all()
    # Only a hash of the secret is stored: the cookie's token is nowhere in the table.
    token = first.get_cookie("remember_token").value.split("|")[0].split(":")[1]
    assert all(len(h) == 64 and token not in h for h in hashes)


def test_a_cookie_of_the_old_kind_names_no_session(app, users):
    client = app.test_client()
    with client.session_transaction() as session:
        session["_user_id"] = str(users["alice"])  # what cookies carried before user_sessions
        session["_fresh"] = True
    assert signed_out(client)


# -- logout ------------------------------------------------------------------------------------

def test_a_remember_cookie_captured_before_logout_no_longer_signs_in(app, users):
    client = sign_in(app, remember=True)
    remembered = copy_of(app, client, cookies=("remember_token",))  # a fresh browser session: no session cookie
    assert client.post("/auth/logout").status_code == 303
    assert signed_out(remembered)
    assert session_ids(app) == []


def test_logout_survives_a_redis_flush(app, users):
    client = sign_in(app, remember=True)
    copy = copy_of(app, client)
    client.post("/auth/logout")
    with app.app_context():
        redis_store.client.flushdb()  # as after a Redis restart without persistence
    assert signed_out(copy)


def test_revocation_does_not_fail_open_without_redis(app, users):
    client = sign_in(app, remember=True)
    copy_session, copy_remember = copy_of(app, client, ("session",)), copy_of(app, client, ("remember_token",))
    client.post("/auth/logout")
    config = TestConfig()
    config.SQLALCHEMY_DATABASE_URI = app.config["SQLALCHEMY_DATABASE_URI"]
    config.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there
    without_redis = create_app(config)
    try:
        for copy in (copy_session, copy_remember):
            other = without_redis.test_client()
            for cookie in ("session", "remember_token"):
                if copy.get_cookie(cookie):
                    other.set_cookie(cookie, copy.get_cookie(cookie).value)
            response = other.get("/")
            assert response.status_code == 303 and "/auth/login" in response.headers["Location"]
        # ...while a live session keeps working there: sessions do not need Redis at all.
        live = sign_in(app)
        other = without_redis.test_client()
        other.set_cookie("session", live.get_cookie("session").value)
        assert other.get("/").status_code == 200
    finally:
        with without_redis.app_context():
            db.engine.dispose()


# -- the sessions page -------------------------------------------------------------------------

def test_the_sessions_page_lists_devices_and_marks_this_browser(app, users):
    laptop = sign_in(app, agent=FIREFOX)
    sign_in(app, agent=PHONE, remember=True)
    sign_in(app, "bob")  # someone else's: not listed
    page = laptop.get("/profile/sessions")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "Firefox · Linux" in html and "Chrome · Android" in html
    assert len(re.findall(r'<tr id="session-', html)) == 2
    mine, phone = session_ids(app)
    assert re.search(rf'id="session-{mine}">.*?id="this-session"', html, re.S)
    assert not re.search(rf'id="session-{phone}">[^/]*?id="this-session"', html, re.S)
    assert 'href="/profile/sessions"' in laptop.get("/profile").get_data(as_text=True)  # linked from the profile


def test_revoking_a_session_ends_its_cookies_and_closes_its_sockets(app, users):
    laptop, phone = sign_in(app), sign_in(app, agent=PHONE, remember=True)
    copy = copy_of(app, phone)
    _mine, phone_id = session_ids(app)
    pubsub, drain = listen(app)
    try:
        response = laptop.post(f"/profile/sessions/{phone_id}/revoke")
        events = drain()
    finally:
        pubsub.close()
    assert response.status_code == 303 and response.headers["Location"] == "/profile/sessions"
    assert {"type": "close_session", "session_id": phone_id} in events
    assert signed_out(phone) and signed_out(copy)
    assert signed_in(laptop)
    assert "That session is signed out." in laptop.get("/profile/sessions").get_data(as_text=True)


def test_revoking_this_browsers_own_session_signs_it_out(app, users):
    client = sign_in(app, remember=True)
    (mine,) = session_ids(app)
    response = client.post(f"/profile/sessions/{mine}/revoke")
    assert response.status_code == 303 and response.headers["Location"] == "/auth/login"
    assert signed_out(client)


@pytest.mark.parametrize("session_id", ["nope", "x" * 300, "a%00b", "..%2F..", "bob's"])
def test_revoking_an_unknown_or_someone_elses_session_is_404(app, users, session_id):
    alice = sign_in(app)
    bob = sign_in(app, "bob")
    if session_id == "bob's":
        session_id = session_ids(app, "bob")[0]
    response = alice.post(f"/profile/sessions/{session_id}/revoke")
    assert response.status_code == 404
    assert signed_in(bob) and signed_in(alice)


def test_sign_out_other_sessions_keeps_only_this_one(app, users):
    laptop = sign_in(app)
    others = [sign_in(app, agent=PHONE, remember=True), sign_in(app, remember=True)]
    copies = [copy_of(app, c, ("remember_token",)) for c in others]
    bob = sign_in(app, "bob")
    pubsub, drain = listen(app)
    try:
        response = laptop.post("/profile/sessions/revoke-others")
        events = drain()
    finally:
        pubsub.close()
    assert response.status_code == 303
    assert "2 other sessions signed out." in laptop.get("/profile/sessions").get_data(as_text=True)
    assert len([e for e in events if e["type"] == "close_session"]) == 2
    assert all(signed_out(c) for c in others + copies)
    assert signed_in(laptop) and signed_in(bob)
    assert len(session_ids(app)) == 1


# -- the password ------------------------------------------------------------------------------

def test_changing_the_password_signs_out_every_other_session(app, users):
    laptop, phone = sign_in(app), sign_in(app, agent=PHONE, remember=True)
    remembered = copy_of(app, phone, ("remember_token",))
    response = laptop.post("/profile/password", data={"current_password": "password123",
                                                      "new_password": "correct-horse-battery"})
    assert response.status_code == 303 and response.headers["Location"] == "/profile/sessions"
    assert "1 other session was signed out." in laptop.get("/profile/sessions").get_data(as_text=True)
    assert signed_out(phone) and signed_out(remembered)
    assert signed_in(laptop)
    assert app.test_client().post("/auth/login", data={"username": "alice", "password": "password123"}) \
        .status_code == 401
    sign_in(app, password="correct-horse-battery")


@pytest.mark.parametrize("current, new, status, message", [
    ("wrong-password", "correct-horse-battery", 403, "That password is not right."),
    ("password123", "short", 422, "Passwords need 8 to 128 characters."),
    ("password123", "x" * 129, 422, "Passwords need 8 to 128 characters."),
    ("x" * 129, "correct-horse-battery", 422, "Passwords are at most 128 characters."),
    ("password123", "iloveyou", 422, "one of the most common"),
    ("password123", "Alice-2026!", 422, "must not contain the username"),
    ("", "correct-horse-battery", 422, "required"),
])
def test_a_refused_password_change_says_why_and_changes_nothing(app, users, current, new, status, message):
    laptop, phone = sign_in(app), sign_in(app, agent=PHONE)
    response = laptop.post("/profile/password", data={"current_password": current, "new_password": new})
    assert response.status_code == status
    assert message in response.get_data(as_text=True)
    assert signed_in(phone)
    sign_in(app)  # the old password still works


def test_a_password_change_works_without_javascript_or_with_htmx(app, users):
    client = sign_in(app)
    token = client.csrf_token()
    response = client.post("/profile/password", csrf=False, headers={"HX-Request": "true", "X-CSRFToken": token},
                           data={"current_password": "wrong-password", "new_password": "correct-horse-battery"})
    assert response.status_code == 403 and "That password is not right." in response.get_data(as_text=True)
    assert "<html" not in response.get_data(as_text=True)


# -- the account -------------------------------------------------------------------------------

def test_deleting_the_account_deletes_its_sessions(app, users):
    client, phone = sign_in(app), sign_in(app, agent=PHONE, remember=True)
    remembered = copy_of(app, phone, ("remember_token",))
    assert client.post("/account/delete", data={"password": "password123"}).status_code == 303
    assert session_ids(app) == []
    assert signed_out(phone) and signed_out(remembered)


def test_a_disabled_accounts_sessions_end_for_good(app, users):
    phone = sign_in(app, "bob", agent=PHONE, remember=True)
    remembered = copy_of(app, phone, ("remember_token",))
    with app.app_context():
        db.session.get(User, users["bob"]).is_disabled = True
        db.session.commit()
    assert signed_out(remembered)
    assert session_ids(app, "bob") == []  # deleted on sight: enabling the account again does not revive it
    with app.app_context():
        db.session.get(User, users["bob"]).is_disabled = False
        db.session.commit()
    assert signed_out(phone)


def test_an_admin_disabling_an_account_ends_its_sessions_at_once(app, users):
    """Ended when disabled, not when next seen: enabling the account again revives none of them."""
    from webchat.services import admin

    phone = sign_in(app, "bob", agent=PHONE, remember=True)
    with app.test_request_context("/"):
        admin.set_disabled(db.session.get(User, users["alice"]), users["bob"], True)
        assert session_ids(app, "bob") == []
        admin.set_disabled(db.session.get(User, users["alice"]), users["bob"], False)
    assert signed_out(phone)


# -- cost and upkeep ---------------------------------------------------------------------------

def test_a_signed_in_page_finds_its_session_and_user_in_one_query(app, users, count_queries):
    client = sign_in(app)
    counter = count_queries()
    with counter:
        assert client.get("/profile/sessions").status_code == 200
    # the session with its user (current_user reads no other row), then the page's list
    assert counter.count == 2, counter.statements
    assert "JOIN users" in counter.statements[0] and "user_sessions.token_hash" in counter.statements[0]


def test_last_seen_is_written_at_most_once_in_five_minutes(app, users, count_queries):
    client = sign_in(app)
    with app.app_context():
        db.session.execute(update(UserSession).values(last_seen_at=utcnow() - timedelta(minutes=6)))
        db.session.commit()
    counter = count_queries()
    with counter:
        for _ in range(3):
            assert client.get("/profile").status_code == 200
    writes = [s.split()[1] for s in counter.statements if s.lstrip().upper().startswith("UPDATE")]
    assert sorted(writes) == ["user_sessions", "users"], counter.statements
    with app.app_context():
        row = db.session.scalar(select(UserSession))
        assert utcnow() - row.last_seen_at < timedelta(minutes=1)


def test_a_session_idle_past_the_limit_ends(app, users):
    client = sign_in(app, remember=True)
    with app.app_context():
        db.session.execute(update(UserSession).values(last_seen_at=utcnow() - timedelta(days=31)))
        db.session.commit()
    assert signed_out(client)
    assert session_ids(app) == []


def test_signing_in_again_in_the_same_browser_ends_its_previous_session(app, users):
    client = sign_in(app)
    assert client.post("/auth/login", data={"username": "alice", "password": "password123"}).status_code == 303
    assert len(session_ids(app)) == 1
    assert signed_in(client)
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(UserSession)) == 1


def test_keep_me_signed_in_brings_a_new_browser_session_back_to_the_same_session(app, users):
    client = sign_in(app, remember=True)
    reopened = copy_of(app, client, ("remember_token",))  # the browser was closed: no session cookie
    assert signed_in(reopened)
    assert len(session_ids(app)) == 1
    html = reopened.get("/profile/sessions").get_data(as_text=True)
    assert 'id="this-session"' in html  # the reopened browser knows which session it is
