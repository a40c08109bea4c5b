"""Accounts: register, sign in and out, profile, deletion, CSRF and rate limits."""
import pytest
from sqlalchemy import select

from tests.conftest import login_client, make_user
from webchat.extensions import db
from webchat.models import User


def register(client, username="erin", password="password123", name="Erin"):
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
        assert "password123" not in user.password_hash


def test_nickname_defaults_to_username(app, client):
    register(client, name="")
    with app.app_context():
        assert db.session.scalar(select(User.name).where(User.username == "erin")) == "erin"


@pytest.mark.parametrize("username, password, message", [
    ("ab", "password123", "between 3 and 32"),
    ("x" * 33, "password123", "between 3 and 32"),
    ("bad name", "password123", "Only letters"),
    ("<script>", "password123", "Only letters"),
    ("", "password123", "required"),
    ("frank", "short", "8 to 1024"),
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


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login", "/auth/logout", "/account/delete", "/profile"])
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
