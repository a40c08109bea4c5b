"""flask create-admin and flask seed-demo."""
import pytest
from sqlalchemy import func, select

from webchat.extensions import db
from webchat.models import Conversation, User
from webchat.services import read_state as reads


def test_create_admin_makes_a_new_admin_who_can_sign_in(app, client):
    result = app.test_cli_runner().invoke(args=["create-admin", "Boss", "--password", "secret-pass"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert db.session.scalar(select(User.is_admin).where(User.username == "Boss")) is True
    assert client.post("/auth/login", data={"username": "boss", "password": "secret-pass"}).status_code == 303
    assert client.get("/admin/").status_code == 200


def test_create_admin_promotes_an_existing_user(app, users):
    result = app.test_cli_runner().invoke(args=["create-admin", "bob"])
    assert result.exit_code == 0 and "now an admin" in result.output
    with app.app_context():
        assert db.session.get(User, users["bob"]).is_admin


def test_create_admin_prompts_for_the_password(app, client):
    result = app.test_cli_runner().invoke(args=["create-admin", "eve"], input="long-password\nlong-password\n")
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert db.session.scalar(select(User.is_admin).where(User.username == "eve")) is True
    assert client.post("/auth/login", data={"username": "eve", "password": "long-password"}).status_code == 303


def test_create_admin_refuses_bad_input(app):
    runner = app.test_cli_runner()
    assert runner.invoke(args=["create-admin", "eve", "--password", "short"]).exit_code != 0
    assert runner.invoke(args=["create-admin", "bad name!", "--password", "long-password"]).exit_code != 0
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 0


def test_seed_demo_is_repeatable(app):
    runner = app.test_cli_runner()
    for _ in range(2):
        result = runner.invoke(args=["seed-demo"])
        assert result.exit_code == 0, result.output
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 4
        assert db.session.scalar(select(func.count()).select_from(Conversation)) == 2


def test_recount_unread_rebuilds_the_counters_of_messages_loaded_around_the_app(app, users):
    from webchat.models import Message, utcnow
    from webchat.services import conversations as convs

    with app.app_context():
        alice, bob = db.session.get(User, users["alice"]), db.session.get(User, users["bob"])
        direct = convs.find_or_create_direct(alice, bob)
        db.session.add_all([Message(conversation_id=direct.id, sender_id=alice.id, kind="text", body=f"loaded {i}",
                                    created_at=utcnow()) for i in range(3)])
        db.session.commit()
        assert reads.unread_counts(bob.id) == {}  # loaded around the app: not counted yet
    result = app.test_cli_runner().invoke(args=["recount-unread"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert reads.unread_counts(users["bob"]) == {direct.id: 3}


def test_create_admin_on_an_existing_user_keeps_their_password(app, users):
    client = app.test_client()
    bob = client.post("/auth/login", data={"username": "bob", "password": "password123"})
    assert bob.status_code == 303
    result = app.test_cli_runner().invoke(args=["create-admin", "bob"])  # no prompt, no --password
    assert result.exit_code == 0, result.output
    assert "now an admin" in result.output and "password is unchanged" in result.output
    with app.app_context():
        assert db.session.get(User, users["bob"]).is_admin
    assert client.get("/admin/").status_code == 200  # the session bob had goes on
    other = app.test_client()
    assert other.post("/auth/login", data={"username": "bob", "password": "password123"}).status_code == 303


def test_create_admin_ignores_a_password_without_reset_password(app, users):
    result = app.test_cli_runner().invoke(args=["create-admin", "bob", "--password", "brand-new-secret"])
    assert result.exit_code == 0 and "--reset-password" in result.output
    client = app.test_client()
    assert client.post("/auth/login", data={"username": "bob", "password": "password123"}).status_code == 303


def test_create_admin_reset_password_replaces_it_and_ends_their_sessions(app, users):
    client = app.test_client()
    client.post("/auth/login", data={"username": "bob", "password": "password123", "remember": "y"})
    result = app.test_cli_runner().invoke(args=["create-admin", "bob", "--reset-password"],
                                          input="brand-new-secret\nbrand-new-secret\n")
    assert result.exit_code == 0, result.output
    assert "1 signed-in session(s) were signed out" in result.output
    assert client.get("/").status_code == 303  # signed out, "keep me signed in" included
    fresh = app.test_client()
    assert fresh.post("/auth/login", data={"username": "bob", "password": "password123"}).status_code == 401
    assert fresh.post("/auth/login", data={"username": "bob", "password": "brand-new-secret"}).status_code == 303


@pytest.mark.parametrize("args", [
    ["create-admin", "eve", "--password", "password123"],  # a common password
    ["create-admin", "eve", "--password", "eve-rocks-2026"],  # contains the username
    ["create-admin", "eve", "--password", "x" * 129],
    ["create-admin", "bob", "--reset-password", "--password", "x" * 129],
    ["create-admin", "bob", "--reset-password", "--password", "iloveyou"],
])
def test_create_admin_applies_the_password_rules(app, users, args):
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code != 0
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User).where(User.username == "eve")) == 0
        assert not db.session.get(User, users["bob"]).is_admin
