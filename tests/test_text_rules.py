"""Invisible and direction-changing characters in bodies, nicknames and group names; look-alike nicknames."""
import io

import pytest
from sqlalchemy import select

from tests.conftest import image_bytes, login_client, make_user
from webchat.extensions import db
from webchat.models import Conversation, Message
from webchat.services import DomainError
from webchat.services import conversations as convs
from webchat.services import messages as msgs
from webchat.services.people import name_labels
from webchat.services.text_rules import check_display_name, name_key, visible_text

HX = {"HX-Request": "true"}
RLO, PDF, LRI, PDI, ZWSP, ZWJ, WJ, BOM, LRM, RLM, ALM = (
    "\u202e", "\u202c", "\u2066", "\u2069", "\u200b", "\u200d", "\u2060", "\ufeff", "\u200e", "\u200f", "\u061c")
INVISIBLE = [ZWSP, ZWSP * 3, ZWJ + WJ + BOM, RLO + PDF, LRI + PDI + LRM + RLM + ALM, f" {ZWSP}\n{ZWSP} ",
             "\u3164", "\u2800", "\u115f\u1160", "\u00ad", "\u034f"]


@pytest.mark.parametrize("value", INVISIBLE)
def test_nothing_visible_is_left_of_invisible_characters(value):
    assert visible_text(value).visible is False


@pytest.mark.parametrize("value, text", [
    (f"a{ZWSP}b", "ab"),
    (f"{RLO}gpj.exe{PDF}", "gpj.exe"),
    (f"{LRI}x{PDI}{LRM}{RLM}{ALM}{BOM}{WJ}", "x"),
    ("مرحبا", "مرحبا"),
    ("👍", "👍"),
])
def test_visible_text_strips_bidi_controls_and_zero_width_characters(value, text):
    assert visible_text(value) == (text, True)


def test_visible_text_of_nothing():
    assert visible_text(None) == ("", False) and visible_text("") == ("", False)


@pytest.mark.parametrize("name, expected", [
    ("Alice", "Alice"),
    (f"  Al{ZWSP}ice{RLO} ", "Alice"),
    ("Ann\n\t  Lee", "Ann Lee"),
    ("x" * 64, "x" * 64),
    (f"{'y' * 64}{ZWSP * 10}", "y" * 64),  # invisible characters do not count against the 64
])
def test_display_names_lose_invisible_characters(name, expected):
    assert check_display_name(name) == expected


@pytest.mark.parametrize("name", ["", "   ", ZWSP, RLO + PDF, "\u3164", "x" * 65, None, 5])
def test_display_names_need_1_to_64_visible_characters(name):
    with pytest.raises(DomainError) as refused:
        check_display_name(name)
    assert refused.value.status == 422 and "1 to 64" in refused.value.message


@pytest.mark.parametrize("a, b", [("Alice", "alice"), ("Alice", f"Al{ZWSP}ice"), ("alice", "ａｌｉｃｅ"),
                                  ("Ann Lee", " ann  lee "), ("Straße", "STRASSE")])
def test_names_that_look_the_same_have_one_key(a, b):
    assert name_key(a) == name_key(b)


def test_different_names_have_different_keys():
    assert name_key("Alice") != name_key("Alicia")


def test_labels_tell_apart_only_look_alike_nicknames(app, users):
    with app.app_context():
        real, fake, other = make_user("real_alice", name="Alice"), make_user("fake", name="alice"), make_user("zed")
        labels = name_labels([real, fake, other, real])
        assert labels == {real.id: ("real_alice", True), fake.id: ("fake", True), other.id: ("zed", False)}


@pytest.fixture
def direct(app, users):
    with app.test_request_context():
        from webchat.models import User

        alice, bob = db.session.get(User, users["alice"]), db.session.get(User, users["bob"])
        return convs.find_or_create_direct(alice, bob).id


@pytest.mark.parametrize("body", [ZWSP, f"{ZWSP}{ZWJ}{BOM}", f"{RLO}{PDF}", f" {LRM} "])
def test_a_message_of_only_invisible_characters_is_a_clear_422(app, direct, body):
    client = login_client(app, "alice")
    for headers in ({}, HX):
        response = client.post(f"/conversations/{direct}/messages", data={"body": body}, headers=headers)
        assert response.status_code == 422
        assert "Write something or attach an image" in response.get_data(as_text=True)
    with app.app_context():
        assert db.session.scalar(select(Message.id).where(Message.conversation_id == direct)) is None


def test_an_image_may_come_with_an_invisible_body_which_is_dropped(app, direct):
    client = login_client(app, "alice")
    response = client.post(f"/conversations/{direct}/messages",
                           data={"body": ZWSP, "image": (io.BytesIO(image_bytes("PNG")), "p.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 303
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.conversation_id == direct))
        assert message.image_id is not None and message.body == ""
        assert db.session.get(Conversation, direct).last_message_image is True  # listed as [Image]


def test_visible_text_keeps_its_joiners_and_marks(app, direct):
    # Bodies keep them: Persian needs the non-joiner, emoji sequences the joiner.
    text = f"می{chr(0x200c)}خواهم 👨{ZWJ}👩{ZWJ}👧"
    with app.test_request_context():
        assert msgs.check_message(text, None, None) == (text, None)


def test_group_names_follow_the_display_name_rule(app, users):
    with app.test_request_context():
        from webchat.models import User

        alice = db.session.get(User, users["alice"])
        with pytest.raises(DomainError, match="Group names are 1 to 64 characters"):
            convs.create_group(alice, ZWSP * 3, [users["bob"], users["carol"]])
        group = convs.create_group(alice, f"{RLO}Team{PDF}", [users["bob"], users["carol"]])
        assert group.name == "Team"
        with pytest.raises(DomainError, match="Group names are 1 to 64 characters"):
            convs.update_group(alice, group, f"{RLO}")
        convs.update_group(alice, group, f"Crew{ZWSP}")
        assert db.session.get(Conversation, group.id).name == "Crew"
