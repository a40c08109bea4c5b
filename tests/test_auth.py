"""Accounts: register, sign in and out, profile, deletion, CSRF and rate limits."""
import logging
import re

import pytest
from sqlalchemy import select

from tests.conftest import login_client, make_user
from webchat.extensions import db, redis_store
from webchat.models import User


STRONG = "correct-horse-battery"  # passes the password rules ("password123" is a common one)


def register(client, username="erin", password=STRONG, name="Erin"):
    return client.post("/auth/register", data={"username": username, "password": password, "name": name})


def test_register_signs_in_and_redirects_home(client):
    response = register(client)
    assert response.status_code == 303
    assert response.headers["Location"] == "/"
    assert "Erin" in client.get("/").get_data(as_text=True)


def test_password_is_hashed_with_argon2(app, client):
    register(client)
    with app.app_context():
        user = db.session.scalar(select(User).where(User.username == "erin"))
        assert user.password_hash.startswith("$argon2id$")
        assert STRONG not in user.password_hash


def test_nickname_defaults_to_username(app, client):
    register(client, name="")
    with app.app_context():
        assert db.session.scalar(select(User.name).where(User.username == "erin")) == "erin"


@pytest.mark.parametrize("username, password, message", [
    ("ab", STRONG, "between 3 and 32"),
    ("x" * 33, STRONG, "between 3 and 32"),
    ("bad name", STRONG, "Only letters"),
    ("<script>", STRONG, "Only letters"),
    ("", STRONG, "required"),
    ("frank", "short", "8 to 128"),
    ("frank", "", "required"),
])
def test_register_validation(client, username, password, message):
    response = register(client, username=username, password=password)
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)


def test_duplicate_username_any_case(client, users):
    response = register(client, username="ALICE")
    assert response.status_code == 422
    assert "already taken" in response.get_data(as_text=True)


def test_login_and_next_redirect(client, users):
    response = client.post("/auth/login?next=/profile", data={"username": "Alice", "password": "password123"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/profile"


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil.example"])
def test_login_never_redirects_off_site(client, users, target):
    response = client.post("/auth/login", query_string={"next": target},
                           data={"username": "alice", "password": "password123"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/"


@pytest.mark.parametrize("username, password", [("alice", "wrong-password"), ("nobody", "password123")])
def test_wrong_credentials_do_not_say_which(client, users, username, password):
    response = client.post("/auth/login", data={"username": username, "password": password})
    assert response.status_code == 401
    page = response.get_data(as_text=True)
    assert "Wrong username or password." in page


def test_disabled_user_cannot_sign_in(app, client, users):
    with app.app_context():
        db.session.get(User, users["bob"]).is_disabled = True
        db.session.commit()
    response = client.post("/auth/login", data={"username": "bob", "password": "password123"})
    assert response.status_code == 401
    # The right password learns why; a wrong one learns nothing more than for anyone else.
    assert "This account has been disabled." in response.get_data(as_text=True)
    assert client.get("/").status_code in (302, 303)
    wrong = client.post("/auth/login", data={"username": "bob", "password": "not-his-password"})
    assert wrong.status_code == 401 and "Wrong username or password." in wrong.get_data(as_text=True)
    assert "disabled" not in wrong.get_data(as_text=True)


def test_remember_sets_a_remember_cookie(client, users):
    client.post("/auth/login", data={"username": "alice", "password": "password123", "remember": "y"})
    assert client.get_cookie("remember_token") is not None


def test_signing_out_also_ends_keep_me_signed_in(client, users):
    client.post("/auth/login", data={"username": "alice", "password": "password123", "remember": "y"})
    assert client.get_cookie("remember_token") is not None
    assert client.post("/auth/logout").status_code == 303
    assert client.get_cookie("remember_token") is None  # deleted with the session
    response = client.get("/")
    assert response.status_code == 303 and "/auth/login" in response.headers["Location"]


def test_a_session_signed_out_elsewhere_does_not_come_back_through_keep_me_signed_in(app, users):
    first = app.test_client()
    first.post("/auth/login", data={"username": "alice", "password": "password123", "remember": "y"})
    copy = app.test_client()  # the same cookies in another browser
    for cookie in ("session", "remember_token"):
        copy.set_cookie(cookie, first.get_cookie(cookie).value)
    assert first.post("/auth/logout").status_code == 303
    response = copy.get("/")  # the copied session was signed out: so is its remember cookie
    assert response.status_code == 303 and "/auth/login" in response.headers["Location"]
    assert copy.get_cookie("remember_token") is None


def test_logout_signs_out(client, users, auth):
    auth.login()
    response = auth.logout()
    assert response.status_code == 303 and response.headers["Location"] == "/auth/login"
    assert client.get("/").status_code in (302, 303)


def test_pages_need_sign_in(client):
    response = client.get("/")
    assert response.status_code in (302, 303)
    assert response.headers["Location"].startswith("/auth/login?next=")


def test_fragments_need_sign_in_with_401(client):
    assert client.get("/users/search?q=a", headers={"HX-Request": "true"}).status_code == 401


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login", "/auth/logout", "/account/delete", "/profile",
                                  "/profile/password", "/profile/sessions/revoke-others"])
def test_csrf_is_required(client, users, auth, path):
    auth.login()
    response = client.post(path, data={"username": "zed", "password": "password123"}, csrf=False)
    assert response.status_code == 400
    assert "expired" in response.get_data(as_text=True)


def test_csrf_header_is_accepted_for_htmx(client, users, auth):
    auth.login()
    token = client.csrf_token()
    response = client.post("/profile", data={"name": "Ally", "remark": ""}, csrf=False,
                           headers={"X-CSRFToken": token, "HX-Request": "true"})
    assert response.status_code == 303


def test_profile_update(app, client, users, auth):
    auth.login()
    response = client.post("/profile", data={"name": "Ally", "remark": "hello <b>world</b>"})
    assert response.status_code == 303
    page = client.get("/profile").get_data(as_text=True)
    assert "hello &lt;b&gt;world&lt;/b&gt;" in page
    assert page.count("Your profile is saved.") == 1  # said once, after the save...
    assert "Your profile is saved." not in client.get("/profile").get_data(as_text=True)  # ...not again


@pytest.mark.parametrize("name, remark, message", [
    ("", "", "required"), ("x" * 65, "", "64"), ("Ok", "y" * 201, "200"),
])
def test_profile_validation(client, users, auth, name, remark, message):
    auth.login()
    response = client.post("/profile", data={"name": name, "remark": remark})
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)


def test_delete_account_needs_the_password(app, client, users, auth):
    auth.login()
    response = client.post("/account/delete", data={"password": "nope-nope"})
    assert response.status_code == 403
    with app.app_context():
        assert db.session.get(User, users["alice"]) is not None


def test_a_deleted_accounts_other_session_never_signs_in_the_next_account(app, users):
    with app.app_context():
        doomed_id = make_user("zoe").id  # the newest account: SQLite would hand its id out again
    first, second = login_client(app, "zoe"), login_client(app, "zoe")
    assert first.post("/account/delete", data={"password": "password123"}).status_code == 303
    with app.app_context():
        newcomer_id = make_user("newcomer").id
    assert newcomer_id > doomed_id
    response = second.get("/")
    assert response.status_code == 303 and "/auth/login" in response.headers["Location"]


def test_delete_account_removes_user_and_direct_conversations(app, client, users, auth):
    from webchat.models import Conversation, Message
    from webchat.services.conversations import create_group, find_or_create_direct
    from webchat.services.messages import send_message

    with app.test_request_context():
        alice, bob, carol = (db.session.get(User, users[n]) for n in ("alice", "bob", "carol"))
        direct = find_or_create_direct(alice, bob)
        send_message(alice, direct, "hi")
        group = create_group(alice, "g", [bob.id, carol.id])
        send_message(alice, group, "in group")
        send_message(bob, group, "bob in group")
        direct_id, group_id = direct.id, group.id
    auth.login()
    response = client.post("/account/delete", data={"password": "password123"})
    assert response.status_code == 303
    with app.app_context():
        assert db.session.get(User, users["alice"]) is None
        assert db.session.get(Conversation, direct_id) is None
        group = db.session.get(Conversation, group_id)
        assert group is not None and group.owner_id == users["bob"]  # longest-standing member
        bodies = db.session.scalars(select(Message.body).where(Message.kind == "text")).all()
        assert bodies == ["bob in group"]
    assert client.get("/").status_code in (302, 303)


def test_login_is_rate_limited(app, users):
    from webchat import create_app
    from webchat.config import TestConfig
    from webchat.extensions import limiter

    config = TestConfig()
    config.RATELIMIT_ENABLED = True
    limited = create_app(config)
    limited.test_client_class = type(app.test_client())
    client = limited.test_client()
    try:
        codes = [client.post("/auth/login", data={"username": "alice", "password": "wrong-pass"}).status_code
                 for _ in range(12)]
    finally:
        limiter.enabled = False
    assert codes[0] == 401
    assert codes[-1] == 429


# -- limits: per address, per account, and registration ------------------------------------------

@pytest.fixture
def limited_app(app):
    """Make an app like the test one with rate limits on (settings: LIMITED_SETTINGS); dispose after."""
    from webchat import create_app
    from webchat.config import TestConfig
    from webchat.extensions import limiter

    made = []

    def make(**settings):
        config = TestConfig()
        config.RATELIMIT_ENABLED = True
        config.SQLALCHEMY_DATABASE_URI = app.config["SQLALCHEMY_DATABASE_URI"]
        for key, value in settings.items():
            setattr(config, key, value)
        limited = create_app(config)
        limited.test_client_class = type(app.test_client())
        made.append(limited)
        return limited

    yield make
    limiter.enabled = False  # the limiter is one object shared by every app of the test run
    for limited in made:
        with limited.app_context():
            db.engine.dispose()


def attempt(client, password, address=None, username="alice"):
    headers = {"X-Forwarded-For": address} if address else {}
    return client.post("/auth/login", data={"username": username, "password": password}, headers=headers)


def test_an_account_is_limited_whatever_address_the_guesses_claim(limited_app, users):
    client = limited_app(PROXY_FIX=1).test_client()
    codes = [attempt(client, "wrong-password", f"203.0.113.{i}").status_code for i in range(5)]
    assert codes == [401] * 5
    refused = attempt(client, "wrong-password", "203.0.113.99")
    assert refused.status_code == 429
    assert "Too many failed sign-ins for this account." in refused.get_data(as_text=True)
    seconds = int(re.search(r"Try again in (\d+) seconds", refused.get_data(as_text=True)).group(1))
    assert 0 < seconds <= 15 and int(refused.headers["Retry-After"]) >= seconds
    # While it waits, even the right password is refused: nothing is learnt from the answer.
    assert attempt(client, "password123", "198.51.100.7").status_code == 429
    # Other accounts are not affected; the same account in other letters' case is.
    assert attempt(client, "password123", "198.51.100.8", username="bob").status_code == 303
    assert attempt(client, "wrong-password", "198.51.100.9", username="ALICE").status_code == 429


def test_an_unknown_username_is_limited_like_a_real_one(limited_app, users):
    client = limited_app(PROXY_FIX=1).test_client()
    codes = [attempt(client, "wrong-password", f"203.0.113.{i}", username="nobody").status_code for i in range(6)]
    assert codes == [401] * 5 + [429]


def test_the_delay_doubles_with_each_attempt_after_the_free_ones(app, limited_app, users):
    client = limited_app(PROXY_FIX=1, LOGIN_DELAY_BASE=10).test_client()
    waits = []
    for round_ in range(3):
        for i in range(5 if round_ == 0 else 1):
            assert attempt(client, "wrong-password", f"203.0.113.{i}").status_code == 401
        page = attempt(client, "wrong-password", "203.0.113.50").get_data(as_text=True)
        waits.append(int(re.search(r"Try again in (\d+) seconds", page).group(1)))
        with app.app_context():  # the delay passes
            redis_store.client.hset("webchat:signin:alice", "next", 0)
    assert [9 <= waits[0] <= 10, 19 <= waits[1] <= 20, 39 <= waits[2] <= 40] == [True] * 3, waits


def test_a_successful_sign_in_resets_the_count(limited_app, users):
    client = limited_app(PROXY_FIX=1).test_client()
    for i in range(4):
        assert attempt(client, "wrong-password", f"203.0.113.{i}").status_code == 401
    assert attempt(client, "password123", "203.0.113.10").status_code == 303
    other = type(client)(client.application)
    assert [attempt(other, "wrong-password", f"203.0.113.{i}").status_code for i in range(6)] == [401] * 5 + [429]


def test_without_redis_sign_in_is_refused_not_unlimited(limited_app, users, caplog, monkeypatch):
    # The migrations' logging setup (conftest runs them) disabled the loggers that existed before it.
    monkeypatch.setattr(logging.getLogger("webchat.services.accounts"), "disabled", False)
    client = limited_app(RATELIMIT_ENABLED=False, REDIS_URL="redis://127.0.0.1:9/0").test_client()
    assert client.get("/auth/login").status_code == 200  # the page itself still works
    response = attempt(client, "password123")
    assert response.status_code == 503
    assert "Signing in is unavailable for a moment." in response.get_data(as_text=True)
    assert any("cannot reach Redis" in r.getMessage() for r in caplog.records)


def test_sign_in_is_refused_when_the_per_address_limit_cannot_be_checked(limited_app, users, caplog):
    client = limited_app(RATELIMIT_STORAGE_URI="redis://127.0.0.1:9/0").test_client()
    response = attempt(client, "password123")
    assert response.status_code == 503
    assert "Signing in is unavailable for a moment." in response.get_data(as_text=True)
    assert any("per-address limit" in r.getMessage() for r in caplog.records)
    # Other routes keep working while the limiter's storage is away.
    assert client.get("/auth/login").status_code == 200
    assert client.get("/").status_code == 303


def test_registration_is_limited_per_address(limited_app):
    limited = limited_app()
    codes = [register(limited.test_client(), username=f"new{i}").status_code for i in range(6)]
    assert codes == [303] * 5 + [429]
    with limited.app_context():
        assert db.session.scalar(select(User.id).where(User.username == "new5")) is None


def test_refused_registrations_do_not_use_up_the_limit(limited_app, users):
    limited = limited_app()
    for _ in range(6):
        assert register(limited.test_client(), username="alice").status_code == 422  # taken
    assert register(limited.test_client(), username="fresh").status_code == 303


def test_a_129_character_password_is_refused_everywhere(client, users):
    long = "x" * 129
    response = register(client, password=long)
    assert response.status_code == 422 and "Passwords need 8 to 128 characters." in response.get_data(as_text=True)
    response = client.post("/auth/login", data={"username": "alice", "password": long})
    assert response.status_code == 422 and "Passwords are at most 128 characters." in response.get_data(as_text=True)
    assert register(client, username="maxlen", password="y" * 120 + "-Zq7!wp9").status_code == 303  # 128 is fine


def test_registration_is_refused_when_its_limit_cannot_be_checked(limited_app):
    client = limited_app(RATELIMIT_STORAGE_URI="redis://127.0.0.1:9/0").test_client()
    response = register(client)
    assert response.status_code == 503
    assert "Creating accounts is unavailable for a moment." in response.get_data(as_text=True)
    assert client.get("/auth/register").status_code == 200


def test_production_argon2_settings_and_a_weaker_hash_is_upgraded_at_sign_in(app, monkeypatch):
    """The real hasher's settings (not the suite's cheap ones); an old, weaker hash is redone on sign-in."""
    from argon2 import PasswordHasher

    from webchat.services import accounts

    monkeypatch.setattr(accounts, "_hasher", PasswordHasher())  # what the app uses outside the tests
    with app.app_context():
        make_user("zoe", password="password123")  # the suite's cheap hash: t=1, m=1024
        assert "m=1024,t=1" in db.session.scalar(select(User.password_hash).where(User.username == "zoe"))
    login_client(app, "zoe")
    with app.app_context():
        stored = db.session.scalar(select(User.password_hash).where(User.username == "zoe"))
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert not accounts._hasher.check_needs_rehash(stored)
