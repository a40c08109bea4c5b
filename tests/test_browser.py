"""Chromium (Playwright) end to end: accounts, and two people chatting."""
import re

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from tests.conftest import image_bytes, make_user
from webchat.extensions import db
from webchat.models import User
from webchat.services import membership as access
from webchat.services import conversation_list as lists

pytestmark = pytest.mark.browser


@pytest.fixture
def page_factory(browser, live_server):
    contexts = []

    def make():
        context = browser.new_context(base_url=live_server.url)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10000)
        page.on("dialog", lambda d: d.accept())
        return page

    yield make
    for context in contexts:
        context.close()


def sign_in(page, username, password="password123"):
    page.goto("/auth/login")
    page.fill("#login-username", username)
    page.fill("#login-password", password)
    page.click("#login-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/$"))


def direct_with_history(app, sender: str, count: int = 60):
    """alice and bob's 1:1 holding `count` messages (m000, m001, ...) from `sender`; return its id and theirs."""
    from webchat.services import conversations as convs
    from webchat.services import messages as msgs

    with app.test_request_context():
        people = {"alice": make_user("alice"), "bob": make_user("bob")}
        direct = convs.find_or_create_direct(people["alice"], people["bob"])
        for i in range(count):
            msgs.send_message(people[sender], direct, f"m{i:03d}")
        return direct.id, {name: user.id for name, user in people.items()}


def open_direct(app, page_factory, username="alice"):
    """alice and bob with a 1:1; a page signed in as `username` with it open. Returns (page, cid)."""
    from webchat.services import conversations as convs

    with app.test_request_context():
        alice, bob = make_user("alice"), make_user("bob")
        cid = convs.find_or_create_direct(alice, bob).id
    page = page_factory()
    sign_in(page, username)
    page.goto(f"/conversations/{cid}")
    return page, cid


def alice_with_two_chats(app, carol_says: str | None = None) -> tuple[int, int]:
    """alice's 1:1s with bob and with carol (who may have written first); returns their ids."""
    from webchat.services import conversations as convs
    from webchat.services import messages as msgs

    with app.test_request_context():
        alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
        direct = convs.find_or_create_direct(alice, bob)
        other = convs.find_or_create_direct(alice, carol)
        if carol_says:
            msgs.send_message(carol, other, carol_says)
        return direct.id, other.id


def test_register_sign_out_sign_in(page_factory):
    page = page_factory()
    page.goto("/auth/register")
    page.fill("#register-username", "newbie")
    page.fill("#register-name", "New Bie")
    page.fill("#register-password", "plum kettle orbit 42")  # not one of the common passwords refused
    page.click("#register-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("#nav-profile")).to_have_text("New Bie")
    page.click("#logout-button")
    expect(page).to_have_url(re.compile(r"/auth/login$"))
    page.fill("#login-username", "newbie")
    page.fill("#login-password", "wrong-password")
    page.click("#login-form button[type=submit]")
    expect(page.locator(".error")).to_contain_text("Wrong username or password")
    sign_in(page, "NEWBIE", "plum kettle orbit 42")
    expect(page.locator("#nav-profile")).to_have_text("New Bie")


def test_two_users_chat_share_an_image_make_a_group_and_hide_it(app, page_factory, tmp_path):
    with app.app_context():
        for name in ("alice", "bob", "carol"):
            make_user(name)
    alice, bob = page_factory(), page_factory()
    sign_in(alice, "alice")
    sign_in(bob, "bob")

    # Alice finds Bob and starts a 1:1.
    alice.fill("#user-search-q", "bo")
    alice.click("#start-chat-bob")
    expect(alice).to_have_url(re.compile(r"/conversations/\d+$"))
    cid = alice.url.rsplit("/", 1)[1]
    expect(alice.locator("#live")).to_have_attribute("data-conversation-id", cid)

    alice.fill("#compose-body", "Hello <b>Bob</b>")
    alice.press("#compose-body", "Enter")
    expect(alice.locator(f"#messages-{cid} .bubble").last).to_have_text("Hello <b>Bob</b>")
    expect(alice.locator("#compose-body")).to_have_value("")

    # Bob sees the conversation arrive live on his list, with a badge.
    expect(bob.locator(f"#unread-{cid}")).to_have_text("1")
    expect(bob).to_have_title(re.compile(r"^\(1\) "))
    bob.click(f"#conversation-{cid} a")
    expect(bob.locator(f"#messages-{cid}")).to_contain_text("Hello <b>Bob</b>")
    bob.fill("#compose-body", "line one")
    bob.press("#compose-body", "Shift+Enter")
    bob.type("#compose-body", "line two")
    bob.press("#compose-body", "Enter")
    expect(alice.locator(f"#messages-{cid} .bubble").last).to_have_text("line one\nline two")
    # Each message once, even though it came both as the POST reply and the pushed frame.
    expect(alice.locator(f"#messages-{cid} .msg")).to_have_count(2)
    expect(bob.locator(f"#messages-{cid} .msg")).to_have_count(2)

    # An image.
    picture = tmp_path / "pic.png"
    picture.write_bytes(image_bytes("PNG", (80, 60)))
    alice.set_input_files("#compose-image", str(picture))
    alice.click("#compose-send")
    expect(bob.locator(f"#messages-{cid} .msg-image img")).to_have_count(1)
    src = bob.locator(f"#messages-{cid} .msg-image img").get_attribute("src")
    assert bob.request.get(src).status == 200

    # Alice creates a group with Bob and Carol.
    alice.goto("/conversations/new")
    alice.fill("#group-name", "Weekend")
    alice.fill("#group-search-q", "carol")
    alice.locator("#group-search-results input[type=checkbox]").check()
    alice.locator("#group-form li[data-username=bob] input[type=checkbox]").check()
    alice.click("#create-group-button")
    expect(alice).to_have_url(re.compile(r"/conversations/\d+$"))
    gid = alice.url.rsplit("/", 1)[1]
    expect(alice.locator(f"#messages-{gid}")).to_contain_text("Alice created the group “Weekend”")
    expect(bob.locator(f"#conversation-{gid}")).to_contain_text("Weekend")

    # Bob hides the group; a new message brings it back with its badge.
    bob.goto(f"/conversations/{gid}")
    bob.click("#chat-menu summary")
    bob.click("#hide-button")
    expect(bob).to_have_url(re.compile(r"/$"))
    expect(bob.locator(f"#conversation-{gid}")).to_have_count(0)
    alice.fill("#compose-body", "anyone there?")
    alice.press("#compose-body", "Enter")
    expect(bob.locator(f"#conversation-{gid}")).to_contain_text("anyone there?")
    expect(bob.locator(f"#unread-{gid}")).to_have_text("1")
    # Newest first.
    expect(bob.locator(".conv-row").first).to_have_attribute("id", f"conversation-{gid}")


def test_chat_works_without_javascript(app, browser, live_server):
    with app.app_context():
        make_user("alice")
        make_user("bob")
    context = browser.new_context(base_url=live_server.url, java_script_enabled=False)
    page = context.new_page()
    try:
        sign_in(page, "alice")
        page.fill("#user-search-q", "bob")
        page.press("#user-search-q", "Enter")
        page.click("#start-chat-bob")
        expect(page).to_have_url(re.compile(r"/conversations/\d+$"))
        page.fill("#compose-body", "no js here")
        page.click("#compose-send")
        expect(page.locator(".bubble").last).to_have_text("no js here")
        # The chat page's list needs JavaScript to load; without it, a link leads to the list.
        expect(page.locator(".conv-loading .js-only")).to_be_hidden()
        page.click("#show-list-link")
        expect(page).to_have_url(re.compile(r"/$"))
        expect(page.locator(".conv-row")).to_have_count(1)
    finally:
        context.close()


def test_live_across_two_processes_and_catch_up_after_a_crash(app, browser):
    from tests.support import WebServer
    from webchat.services import conversations as convs

    with app.test_request_context():
        alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
        direct = convs.find_or_create_direct(alice, bob).id
        group = convs.create_group(alice, "Live", [bob.id, carol.id]).id
    a, b = WebServer(app).start(), WebServer(app).start()
    contexts = []
    try:
        def page_on(server, username):
            context = browser.new_context(base_url=server.url)
            contexts.append(context)
            page = context.new_page()
            page.set_default_timeout(15000)
            sign_in(page, username)
            return page

        alice_page, bob_page = page_on(a, "alice"), page_on(b, "bob")
        bob_page.goto(f"/conversations/{group}")
        bob_page.wait_for_function("document.body.classList.contains('offline') === false")
        alice_page.goto(f"/conversations/{group}")

        def alice_says(cid, text):
            alice_page.goto(f"/conversations/{cid}")
            alice_page.fill("#compose-body", text)
            alice_page.press("#compose-body", "Enter")
            expect(alice_page.locator(f"#messages-{cid} .bubble").last).to_have_text(text)

        alice_says(group, "live in group")
        expect(bob_page.locator(f"#messages-{group} .bubble").last).to_have_text("live in group")
        alice_says(direct, "psst 1")
        expect(bob_page.locator(f"#unread-{direct}")).to_have_text("1")
        alice_says(direct, "psst 2")
        expect(bob_page.locator(f"#unread-{direct}")).to_have_text("2")

        # Bob's process dies without a goodbye; Alice keeps talking; the process comes back.
        b.kill()
        alice_says(group, "while you were away")
        alice_says(direct, "psst 3")
        b.start()
        expect(bob_page.locator(f"#messages-{group} .bubble").last).to_have_text("while you were away", timeout=30000)
        expect(bob_page.locator(f"#unread-{direct}")).to_have_text("3")
        expect(bob_page.locator(f"#messages-{group} .msg:not(.system)")).to_have_count(2)
        ids = bob_page.eval_on_selector_all("[id^='message-']", "els => els.map(e => e.id)")
        assert len(ids) == len(set(ids))
    finally:
        for context in contexts:
            context.close()
        a.stop()
        b.stop()


def test_the_list_loads_more_rows_when_scrolled(app, page_factory):
    from webchat.extensions import db
    from webchat.models import User
    from webchat.services import conversations as convs
    from webchat.services import messages as msgs

    with app.test_request_context():
        reader = make_user("reader")
        for i in range(lists.LIST_PAGE + 5):
            other = make_user(f"friend{i:03d}")
            msgs.send_message(db.session.get(User, other.id), convs.find_or_create_direct(reader, other), f"hello {i}")
    page = page_factory()
    sign_in(page, "reader")
    rows = page.locator("#conversation-list .conv-row")
    # On connect the server replays the last 30 s (all of these messages) with their rows: the
    # page keeps the server's order and shows each conversation once.
    expect(rows.first).to_contain_text("hello 54")
    page.locator("#conversation-list-more").scroll_into_view_if_needed()
    expect(page.locator("#conversation-list-more")).to_have_count(0)
    expect(rows).to_have_count(lists.LIST_PAGE + 5)

    def order():
        return [int(t.split("hello ")[-1].split()[0]) for t in rows.all_inner_texts()]

    assert order() == list(range(lists.LIST_PAGE + 4, -1, -1))


@pytest.mark.parametrize("answered", ["before the pushes", "after the pushes"])
def test_a_row_pushed_before_the_chat_page_list_arrives_is_kept(app, page_factory, answered):
    from webchat.extensions import db
    from webchat.models import User
    from webchat.services import conversations as convs
    from webchat.services import messages as msgs

    with app.test_request_context():
        alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
        with_bob = convs.find_or_create_direct(alice, bob).id
        with_carol = convs.find_or_create_direct(alice, carol)
        newest = msgs.send_message(db.session.get(User, carol.id), with_carol, "carol's first")[0].id
        with_carol, carol_id, bob_id = with_carol.id, carol.id, bob.id
    page = page_factory()
    sign_in(page, "alice")
    sockets = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    held = []
    # The chat page's list request is held back until rows have been pushed into the placeholder.
    # Answered by the server at once, the answer is then older than what the page shows; answered
    # after the pushes, it holds the same rows (and htmx settles them over the pushed ones).
    stale = answered == "before the pushes"
    page.route("**/conversations", lambda route: held.append((route, route.fetch() if stale else None)))
    page.goto(f"/conversations/{with_bob}")
    expect(page.locator("#conversation-list[data-loading]")).to_have_count(1)
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(100)
    assert len(held) == 1
    # The socket starts after the newest message of all alice's conversations (carol's), not after
    # the newest of the one on screen: nothing older is replayed.
    expect(page.locator("#live")).to_have_attribute("data-newest", str(newest))
    assert sockets and sockets[-1].endswith(f"after={newest}"), sockets
    # Pushed live, or replayed when the socket opens: either way they land in the placeholder.
    with app.test_request_context():
        msgs.send_message(db.session.get(User, carol_id), access.get_conversation_for(carol_id, with_carol)[0],
                          "carol again")
        msgs.send_message(db.session.get(User, bob_id), access.get_conversation_for(bob_id, with_bob)[0],
                          "bob, on screen")
    early = page.locator(f"#conversation-list[data-loading] #conversation-{with_carol}")
    expect(early).to_contain_text("carol again")
    expect(page.locator(f"#conversation-list[data-loading] #conversation-{with_bob}")).to_contain_text("bob, on screen")
    route, answer = held.pop()
    answer = answer or route.fetch()
    assert ("carol again" in answer.text()) is not stale
    route.fulfill(response=answer)
    expect(page.locator("#conversation-list[data-loading]")).to_have_count(0)
    expect(page.locator(f"#conversation-{with_bob}")).to_have_count(1)
    expect(page.locator(f"#conversation-{with_bob}")).to_contain_text("bob, on screen")
    row = page.locator(f"#conversation-{with_carol}")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("carol again")
    expect(page.locator(f"#unread-{with_carol}")).to_have_text("2")
    expect(page.locator(".conv-row").first).to_have_attribute("id", f"conversation-{with_bob}")
    # The row on screen stays marked, its badge empty (htmx restores a swapped element's server
    # attributes when it settles: the page marks it after that).
    page.wait_for_timeout(300)
    expect(page.locator(f"#conversation-{with_bob}")).to_have_class(re.compile(r"\bactive\b"))
    expect(page.locator(f"#unread-{with_bob}")).to_be_hidden()
    expect(page).to_have_title(re.compile(r"^\(2\) "))


def test_people_ticked_in_one_search_stay_picked_after_the_next(app, page_factory):
    with app.app_context():
        for name in ("alice", "ben", "cat"):
            make_user(name)
    page = page_factory()
    sign_in(page, "alice")
    page.goto("/conversations/new")
    page.fill("#group-name", "Picked")
    page.fill("#group-search-q", "ben")
    page.locator("#group-search-results li[data-username=ben] input").check()
    page.fill("#group-search-q", "cat")
    expect(page.locator("#group-search-results li[data-username=cat]")).to_have_count(1)
    page.locator("#group-search-results li[data-username=cat] input").check()
    expect(page.locator("#group-form li[data-username=ben] input")).to_be_checked()
    expect(page.locator("#group-form li[data-username=cat] input")).to_be_checked()
    page.click("#create-group-button")
    expect(page).to_have_url(re.compile(r"/conversations/\d+$"))
    page.click("#chat-menu summary")
    expect(page.locator("#member-list li")).to_have_count(3)


def test_times_follow_the_page_language_in_a_browser_of_another(app, browser, live_server):
    from webchat.services import conversations as convs
    from webchat.services import messages as msgs

    with app.test_request_context():
        alice, bob = make_user("alice"), make_user("bob")
        direct = convs.find_or_create_direct(alice, bob)
        msgs.send_message(alice, direct, "what time is it?")
        cid = direct.id
    context = browser.new_context(base_url=live_server.url, locale="en-US")
    try:
        page = context.new_page()
        sign_in(page, "alice")
        page.goto(f"/conversations/{cid}")
        stamp = page.locator(f"#messages-{cid} time").first
        expect(stamp).to_have_text(re.compile(r"^\d\d:\d\d [AP]M$"))  # the American browser's clock
        page.goto(f"/conversations/{cid}?lang=zh")
        expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
        expect(stamp).to_have_text(re.compile(r"^\d\d:\d\d$"))  # the page's language: a 24-hour clock
    finally:
        context.close()


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_compose_box_says_what_it_is_on_a_phone_and_how_to_send_on_a_desktop(app, browser, live_server, lang):
    from webchat.services import conversations as convs

    with app.test_request_context():
        alice, bob = make_user("alice"), make_user("bob")
        cid = convs.find_or_create_direct(alice, bob).id
    phone = browser.new_context(base_url=live_server.url, viewport={"width": 390, "height": 844},
                                is_mobile=True, has_touch=True)
    desktop = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 800})
    try:
        for context in (phone, desktop):
            page = context.new_page()
            sign_in(page, "alice")
            page.goto(f"/conversations/{cid}?lang={lang}")
            box = page.locator("#compose-body")
            expect(box).to_be_visible()
            # The placeholder, in the box's own font, fits inside the box's text area.
            room, needed = box.evaluate("""el => {
                const style = getComputedStyle(el);
                const ctx = document.createElement("canvas").getContext("2d");
                ctx.font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
                const room = el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
                return [room, ctx.measureText(el.placeholder).width];
            }""")
            assert needed <= room, f"{'phone' if context is phone else 'desktop'}: placeholder {needed}px in {room}px"
            hint = page.locator("#compose-hint")
            if context is phone:
                expect(hint).to_be_hidden()  # no room on a phone, and Enter makes a new line there
                expect(box).not_to_have_attribute("aria-describedby", "compose-hint")
            else:
                expect(hint).to_be_visible()
                expect(hint).to_contain_text("Shift+Enter")
                expect(box).to_have_attribute("aria-describedby", "compose-hint")
    finally:
        phone.close()
        desktop.close()


def test_group_changes_show_at_once_in_an_open_group(app, page_factory):
    """Renaming, adding and leaving add system lines: an open group shows them and its new header live."""
    from webchat.services import conversations as convs

    with app.test_request_context():
        alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
        make_user("dave")
        gid = convs.create_group(alice, "Old name", [bob.id, carol.id]).id
    owner, viewer = page_factory(), page_factory()
    sign_in(owner, "alice")
    sign_in(viewer, "bob")
    viewer.goto(f"/conversations/{gid}")
    expect(viewer.locator(f"#messages-{gid} .msg.system")).to_have_count(1)

    owner.goto(f"/conversations/{gid}")
    owner.click("#chat-menu summary")  # a menu closes with Escape, and with a click elsewhere
    owner.keyboard.press("Escape")
    expect(owner.locator("#chat-menu[open]")).to_have_count(0)
    owner.click("#chat-menu summary")
    owner.click(f"#messages-{gid}")
    expect(owner.locator("#chat-menu[open]")).to_have_count(0)
    viewer.click("#chat-menu summary")  # the viewer opened and closed the menu: its button keeps focus
    viewer.keyboard.press("Escape")
    expect(viewer.locator("#chat-menu summary")).to_be_focused()
    owner.click("#chat-menu summary")
    owner.fill("#group-name-input", "New name")
    owner.click("#group-settings-form button[type=submit]")
    expect(viewer.locator(f"#messages-{gid} .msg.system").last).to_contain_text("renamed the group to “New name”")
    expect(viewer.locator("#chat-title")).to_have_text("New name")
    expect(viewer).to_have_title(re.compile(r"New name · webchat$"))  # the tab too
    expect(viewer.locator(f"#conversation-{gid}")).to_contain_text("New name")

    owner.click("#chat-menu summary")
    owner.fill("#add-members-input", "dave")
    owner.click("#add-members-form button[type=submit]")
    expect(viewer.locator(f"#messages-{gid} .msg.system").last).to_contain_text("added Dave")
    expect(viewer.locator("#member-list li")).to_have_count(4)

    owner.click("#chat-menu summary")
    owner.click("#leave-button")
    expect(viewer.locator(f"#messages-{gid} .msg.system").last).to_contain_text("Alice left the group")
    # Bob joined before Carol and Dave: the group is his now, with the owner's controls.
    expect(viewer.locator("#member-list li")).to_have_count(3)
    expect(viewer.locator("#disband-button")).to_have_count(1)
    # Each line once; and a new message after them still arrives.
    expect(viewer.locator(f"#messages-{gid} .msg.system")).to_have_count(4)
    viewer.fill("#compose-body", "still here")
    viewer.press("#compose-body", "Enter")
    expect(viewer.locator(f"#messages-{gid} .bubble").last).to_have_text("still here")


def test_a_phone_keyboard_enter_starts_a_new_line(app, browser, live_server):
    from webchat.services import conversations as convs

    with app.test_request_context():
        alice, bob = make_user("alice"), make_user("bob")
        cid = convs.find_or_create_direct(alice, bob).id
    context = browser.new_context(base_url=live_server.url, viewport={"width": 390, "height": 844},
                                  is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        sign_in(page, "alice")
        page.goto(f"/conversations/{cid}")
        page.fill("#compose-body", "line one")
        page.press("#compose-body", "Enter")
        page.type("#compose-body", "line two")
        expect(page.locator("#compose-body")).to_have_value("line one\nline two")
        expect(page.locator(f"#messages-{cid} .bubble")).to_have_count(0)
        page.tap("#compose-send")
        expect(page.locator(f"#messages-{cid} .bubble").last).to_have_text("line one\nline two")
        expect(page.locator("#compose-body")).to_have_value("")
    finally:
        context.close()


def test_what_is_typed_while_a_message_is_sending_is_kept(app, page_factory):
    page, cid = open_direct(app, page_factory)
    held = []
    page.route(f"**/conversations/{cid}/messages", lambda route: held.append(route))

    def wait_held():
        for _ in range(100):  # route handlers run while Playwright waits
            if held:
                return
            page.wait_for_timeout(50)
        raise AssertionError("the send never left")

    page.fill("#compose-body", "first")
    page.press("#compose-body", "Enter")
    wait_held()
    expect(page.locator("#compose-body")).to_have_value("")  # it empties as the message leaves
    page.type("#compose-body", "second, typed meanwhile")
    held.pop().continue_()
    expect(page.locator(f"#messages-{cid} .bubble").last).to_have_text("first")
    expect(page.locator("#compose-body")).to_have_value("second, typed meanwhile")

    # A send that fails puts its text back, before what was typed since.
    page.fill("#compose-body", "")
    page.fill("#compose-body", "x" * 10)
    page.press("#compose-body", "Enter")
    wait_held()
    page.type("#compose-body", "more")
    failed = held.pop()
    failed.fulfill(status=422, body="<p>no</p>")
    expect(page.locator("#compose-body")).to_have_value("x" * 10 + "\nmore")

    # A retry of the same text keeps its client_id (the server may have kept the first try); new
    # text gets a new one, so it is not taken for the message that failed.
    def client_id(route):
        return re.search(r'name="client_id"\r\n\r\n([^\r]+)', route.request.post_data).group(1)

    page.press("#compose-body", "Enter")
    wait_held()
    combined = held.pop()
    assert client_id(combined) != client_id(failed)
    combined.fulfill(status=503, body="<p>busy</p>")
    expect(page.locator("#compose-body")).to_have_value("x" * 10 + "\nmore")
    page.press("#compose-body", "Enter")
    wait_held()
    retry = held.pop()
    assert client_id(retry) == client_id(combined)
    retry.continue_()
    expect(page.locator(f"#messages-{cid} .bubble").last).to_have_text("x" * 10 + "\nmore")


def _mids(page, cid):
    return [int(m) for m in page.locator(f"#messages-{cid} > [data-mid]").evaluate_all(
        "els => els.map(e => e.getAttribute('data-mid'))")]


def test_a_burst_of_messages_stays_in_order_when_the_socket_replays_it(app, page_factory):
    """The socket's replay looks back 30 s before the page's newest message: a burst of 60 sent in a
    second comes back whole, and what is older than the page's first 50 is left to "Load older"."""
    from webchat.services import messages as msgs

    cid, ids = direct_with_history(app, sender="alice")
    alice_id = ids["alice"]
    page = page_factory()
    frames = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(payload)))
    sign_in(page, "bob")
    page.goto(f"/conversations/{cid}")
    for _ in range(200):  # the replay: the 59 messages before the newest, sent in the 30 s before it
        if len(frames) >= 59:
            break
        page.wait_for_timeout(50)
    assert len(frames) >= 59, len(frames)
    # A live message after the replay: once it shows, every replayed frame before it was handled.
    with app.test_request_context():
        msgs.send_to(alice_id, cid, "after the replay")
    expect(page.locator(f"#messages-{cid} .bubble").last).to_have_text("after the replay")
    shown = _mids(page, cid)
    assert len(shown) == 51 and shown == sorted(shown), shown
    page.click("#load-older")
    expect(page.locator(f"#messages-{cid} > [data-mid]")).to_have_count(61)
    shown = _mids(page, cid)
    assert shown == sorted(set(shown))
    expect(page.locator(f"#messages-{cid} .bubble").first).to_have_text("m000")


@pytest.mark.parametrize("total", [120, 60])  # 60: the older page is the last, with no further link
def test_scrolling_up_loads_older_messages_and_keeps_ones_place(app, page_factory, total):
    from webchat.services import conversations as convs
    from webchat.services import messages as msgs

    with app.test_request_context():
        alice, bob = make_user("alice"), make_user("bob")
        direct = convs.find_or_create_direct(alice, bob)
        for i in range(total):
            msgs.send_message(alice, direct, f"m{i:03d}")
        cid = direct.id
    page = page_factory()
    sign_in(page, "bob")
    page.goto(f"/conversations/{cid}")
    expect(page.locator(f"#messages-{cid} > [data-mid]")).to_have_count(50)
    first = page.locator(f"#messages-{cid} > [data-mid]").first
    first_id = first.get_attribute("id")
    # The reader scrolls to the top, and again should the socket's replay (the messages of the last
    # 30 s, arriving as the page opens) have brought them back down to the newest first.
    page.wait_for_function("""([pane, n]) => {
        const p = document.getElementById(pane);
        if (p.querySelectorAll(":scope > [data-mid]").length >= n) return true;
        if (!p.querySelector("#load-older.htmx-request")) p.scrollTop = 0;
        return false;
    }""", arg=[f"messages-{cid}", min(total, 100)], polling=250, timeout=10000)
    expect(page.locator(f"#messages-{cid} > [data-mid]")).to_have_count(min(total, 100))
    # The message that was at the top is still in view, not pushed away by the older ones.
    page.wait_for_function("""([pane, id]) => {
        const p = document.getElementById(pane).getBoundingClientRect();
        const m = document.getElementById(id).getBoundingClientRect();
        return m.top >= p.top - 1 && m.top < p.bottom;
    }""", arg=[f"messages-{cid}", first_id], timeout=5000)


def test_a_refused_image_comes_off_and_a_double_click_or_a_lost_connection_says_the_right_thing(app, page_factory,
                                                                                               tmp_path):
    page, cid = open_direct(app, page_factory)
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    page.set_input_files("#compose-image", str(fake))
    expect(page.locator("#compose-file")).to_contain_text("notes.png")  # the attachment shows
    page.click("#compose-send")
    expect(page.locator("#flash")).to_contain_text("not a PNG, JPEG, GIF or WebP image")
    expect(page.locator("#compose-file")).to_be_hidden()  # refused: it came off
    page.fill("#compose-body", "text after a bad image")
    page.press("#compose-body", "Enter")
    expect(page.locator(f"#messages-{cid} .bubble").last).to_have_text("text after a bad image")
    expect(page.locator("#flash")).to_be_empty()
    # The attachment can also be taken off by hand.
    page.set_input_files("#compose-image", str(fake))
    page.click("#compose-file-remove")
    expect(page.locator("#compose-file")).to_be_hidden()
    assert page.eval_on_selector("#compose-image", "el => el.files.length") == 0
    # Send pressed twice: one message, no error.
    page.fill("#compose-body", "once")
    page.dblclick("#compose-send")
    expect(page.locator(f"#messages-{cid} .bubble").last).to_have_text("once")
    page.wait_for_timeout(300)  # a second request would have answered by now
    expect(page.locator(f"#messages-{cid} .bubble", has_text="once")).to_have_count(1)
    expect(page.locator("#flash")).to_be_empty()
    # Offline: the page says the message was not sent, and keeps it (the image too).
    page.set_input_files("#compose-image", str(fake))
    page.context.set_offline(True)
    try:
        page.fill("#compose-body", "while offline")
        page.click("#compose-send")
        expect(page.locator("#flash")).to_contain_text("Not sent")
        expect(page.locator("#compose-body")).to_have_value("while offline")
        expect(page.locator("#compose-file")).to_contain_text("notes.png")
    finally:
        page.context.set_offline(False)


def test_the_typing_hint_ends_when_the_message_arrives(app, page_factory):
    reader, cid = open_direct(app, page_factory, username="bob")
    writer = page_factory()
    sign_in(writer, "alice")
    writer.goto(f"/conversations/{cid}")
    writer.wait_for_function("document.body.classList.contains('offline') === false")
    reader.wait_for_function("document.body.classList.contains('offline') === false")
    writer.type("#compose-body", "hello there", delay=20)
    expect(reader.locator(f"#typing-{cid}")).to_contain_text("Alice is typing")
    writer.press("#compose-body", "Enter")
    # The message's own swap ends the hint (not the 4 s fallback): read both in the same task the
    # message shows in, rather than racing a timeout.
    hint_when_shown = reader.wait_for_function(f"""() => {{
        const bubbles = document.querySelectorAll('#messages-{cid} .bubble');
        const last = bubbles[bubbles.length - 1];
        if (!last || last.textContent.trim() !== 'hello there') return false;
        return {{hint: document.getElementById('typing-{cid}').textContent}};
    }}""").json_value()
    assert hint_when_shown == {"hint": ""}


def test_a_tall_new_message_is_scrolled_into_view(app, page_factory):
    from webchat.services import messages as msgs

    page, cid = open_direct(app, page_factory, username="bob")
    with app.test_request_context():
        alice = db.session.scalar(select(User).where(User.username == "alice"))
        for i in range(30):
            msgs.send_to(alice.id, cid, f"short {i}")
    expect(page.locator(f"#messages-{cid} .bubble").last).to_have_text("short 29")
    with app.test_request_context():
        msgs.send_to(alice.id, cid, "\n".join(f"line {i}" for i in range(25)))
    expect(page.locator(f"#messages-{cid} .bubble").last).to_contain_text("line 24")
    # The reader was at the bottom: the new message's end is in view, not below the pane.
    page.wait_for_function("""(pane) => {
        const p = document.getElementById(pane), last = p.querySelector(':scope > [data-mid]:last-of-type');
        return last && last.getBoundingClientRect().bottom <= p.getBoundingClientRect().bottom + 1;
    }""", arg=f"messages-{cid}", timeout=5000)


def test_a_chat_opened_on_a_desktop_is_ready_to_type_and_images_are_reachable_by_keyboard(app, page_factory):
    page, _cid = open_direct(app, page_factory)
    expect(page.locator("#compose-body")).to_be_focused()
    page.keyboard.press("Shift+Tab")
    expect(page.locator("#compose-image")).to_be_focused()


def test_hiding_in_one_tab_leaves_the_chat_open_in_another(app, page_factory):
    from webchat.services import conversations as convs

    with app.test_request_context():
        alice, bob = make_user("alice"), make_user("bob")
        cid = convs.find_or_create_direct(alice, bob).id
    first, second = page_factory(), page_factory()
    for page in (first, second):
        sign_in(page, "alice")
        page.goto(f"/conversations/{cid}")
    expect(first.locator(f"#conversation-{cid}")).to_have_count(1)
    second.click("#chat-menu summary")
    second.click("#hide-button")
    expect(first.locator(f"#conversation-{cid}")).to_have_count(0)  # gone from the list
    expect(first.locator(f"#gone-{cid}")).to_have_text("")  # but still open and usable
    first.fill("#compose-body", "still here")
    first.press("#compose-body", "Enter")
    expect(first.locator(f"#messages-{cid} .bubble").last).to_have_text("still here")


def test_a_peer_deleting_their_account_closes_the_open_chat_and_times_stay_local(app, browser, live_server):
    cid, other_id = alice_with_two_chats(app, carol_says="hi")
    context = browser.new_context(base_url=live_server.url, locale="en-US", timezone_id="America/New_York")
    leaver = browser.new_context(base_url=live_server.url)
    try:
        page = context.new_page()
        sign_in(page, "alice")
        page.goto(f"/conversations/{cid}")
        stamp = page.locator(f"#conversation-{other_id} time")
        expect(stamp).to_have_text(re.compile(r"^\d\d:\d\d [AP]M$"))
        bob_page = leaver.new_page()
        sign_in(bob_page, "bob")
        bob_page.goto("/profile")
        bob_page.click("details.danger summary")
        bob_page.fill("#delete-password", "password123")
        bob_page.click("#delete-account-form button[type=submit]")
        expect(page.locator(f"#gone-{cid}")).to_have_text("This conversation is no longer available to you.")
        expect(page.locator(f"#conversation-{cid}")).to_have_count(0)
        # The list came back from the server after the deletion; its times are still the browser's.
        expect(stamp).to_have_text(re.compile(r"^\d\d:\d\d [AP]M$"))
    finally:
        context.close()
        leaver.close()


def test_a_message_for_a_chat_not_open_updates_the_list_without_errors(app, page_factory):
    from webchat.services import messages as msgs

    cid, other_id = alice_with_two_chats(app)
    listing, chatting = page_factory(), page_factory()
    errors = []
    for page in (listing, chatting):
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        sign_in(page, "alice")
    chatting.goto(f"/conversations/{other_id}")  # carol's chat open; listing stays on the list
    for page in (listing, chatting):
        expect(page.locator(f"#conversation-{cid}")).to_have_count(1)
    with app.test_request_context():
        bob_id = db.session.scalar(select(User.id).where(User.username == "bob"))
        msgs.send_to(bob_id, cid, "for the list")  # live, or by the replay of a socket still opening
    for page in (listing, chatting):
        expect(page.locator(f"#conversation-{cid}")).to_contain_text("for the list")
        expect(page.locator(f"#unread-{cid}")).to_have_text("1")
    expect(chatting.locator(f"#messages-{other_id} .bubble")).to_have_count(0)  # not put into carol's chat
    assert not errors, errors


def test_a_message_missing_from_the_middle_comes_back_in_its_place(app, browser):
    """After a reconnect the replay resends the last 30 s: a message the page lacks goes where it belongs."""
    from tests.support import WebServer
    from webchat.services import conversations as convs
    from webchat.services import messages as msgs

    with app.test_request_context():
        alice, bob = make_user("alice"), make_user("bob")
        direct = convs.find_or_create_direct(alice, bob)
        mids = [msgs.send_message(alice, direct, f"m{i}")[0].id for i in range(10)]
        cid = direct.id
    server = WebServer(app).start()
    context = browser.new_context(base_url=server.url)
    try:
        page = context.new_page()
        sign_in(page, "bob")
        page.goto(f"/conversations/{cid}")
        page.wait_for_function("document.body.classList.contains('offline') === false")
        expect(page.locator(f"#messages-{cid} > [data-mid]")).to_have_count(10)
        page.evaluate("id => document.getElementById(id).remove()", f"message-{mids[4]}")
        server.kill()  # the socket drops (1006); htmx reconnects and the socket replays
        expect(page.locator("body")).to_have_class(re.compile(r"\boffline\b"))
        server.start()
        expect(page.locator(f"#message-{mids[4]}")).to_have_count(1, timeout=30000)
        assert _mids(page, cid) == mids
    finally:
        context.close()
        server.stop()


# Reports every Content-Security-Policy violation to the console, where the test collects them
# (an init script: it runs before the page's own, and the policy does not apply to it).
CSP_REPORTER = """
document.addEventListener("securitypolicyviolation", function (e) {
  console.error("CSP violation: " + e.effectiveDirective + " blocked " + (e.blockedURI || "inline") +
                " at " + e.sourceFile + ":" + e.lineNumber + " " + (e.sample || ""));
});
"""


def watch_csp(page) -> list[str]:
    """Collect the page's policy violations: our reporter's, and Chromium's own console errors."""
    violations: list[str] = []
    page.add_init_script(CSP_REPORTER)
    page.on("console", lambda m: violations.append(m.text) if m.type == "error" and (
        "CSP violation" in m.text or "Content Security Policy" in m.text) else None)
    return violations


def test_pages_work_under_the_content_security_policy(app, page_factory):
    """Sign in, open a chat, send and receive live, load older messages: no policy violation on the way."""
    from webchat.services import messages as msgs

    cid, ids = direct_with_history(app, sender="bob")
    bob_id = ids["bob"]
    page = page_factory()
    violations = watch_csp(page)
    policy = page.goto("/auth/login").headers["content-security-policy"]
    assert "script-src 'self';" in policy and "style-src 'self';" in policy and "unsafe" not in policy
    sign_in(page, "alice")
    page.goto(f"/conversations/{cid}")
    page.wait_for_function("document.body.classList.contains('offline') === false")  # the socket is open
    expect(page.locator(f"#messages-{cid} > [data-mid]")).to_have_count(50)
    page.fill("#compose-body", "sent under the policy")
    page.press("#compose-body", "Enter")
    mine = page.locator(f"#messages-{cid} .msg").last
    expect(mine.locator(".bubble")).to_have_text("sent under the policy")
    # The viewer's own messages are styled by their stylesheet, not an inline <style>.
    assert mine.evaluate("el => getComputedStyle(el).flexDirection") == "row-reverse"
    with app.test_request_context():
        msgs.send_to(bob_id, cid, "pushed over the socket")
    expect(page.locator(f"#messages-{cid} .bubble").last).to_have_text("pushed over the socket")
    page.click("#load-older")
    expect(page.locator(f"#messages-{cid} > [data-mid]")).to_have_count(62)
    expect(page.locator(f"#messages-{cid} .bubble").first).to_have_text("m000")
    page.goto("/")  # the list page, with its own socket
    expect(page.locator(f"#conversation-{cid}")).to_contain_text("pushed over the socket")
    page.wait_for_timeout(300)
    assert violations == [], violations


def test_a_form_that_asks_first_sends_nothing_when_the_answer_is_no(app, browser, live_server):
    """The questions that were inline onsubmit handlers are asked by app.js, under the policy."""
    from webchat.services import conversations as convs

    with app.test_request_context():
        alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
        gid = convs.create_group(alice, "Team", [bob.id, carol.id]).id
        bob_id = bob.id
    context = browser.new_context(base_url=live_server.url)
    try:
        page = context.new_page()
        violations = watch_csp(page)
        answers, asked = [False, True], []

        def answer(dialog):
            asked.append(dialog.message)
            dialog.accept() if answers.pop(0) else dialog.dismiss()

        page.on("dialog", answer)
        sign_in(page, "alice")
        page.goto(f"/conversations/{gid}")
        page.click("#chat-menu summary")
        page.click(f"#remove-member-{bob_id}")
        page.wait_for_timeout(300)
        expect(page.locator(f"#member-list li[data-user-id='{bob_id}']")).to_have_count(1)
        page.click(f"#remove-member-{bob_id}")
        expect(page.locator(f"#messages-{gid} .msg.system").last).to_contain_text("removed Bob")
        assert asked == ["Remove this member?"] * 2
        assert violations == [], violations
    finally:
        context.close()


def test_a_member_who_takes_anothers_nickname_is_named_by_username_live(app, page_factory):
    """The page names look-alike senders in messages that arrive live as the server does in the page."""
    from sqlalchemy import update

    from webchat.services import conversations as convs
    from webchat.services import messages as msgs

    with app.test_request_context():
        alice, bob, mallory = make_user("alice"), make_user("bob"), make_user("mallory")
        group = convs.create_group(alice, "Team", [bob.id, mallory.id])
        msgs.send_message(alice, group, "the real one")
        gid, mallory_id = group.id, mallory.id
    page = page_factory()
    sign_in(page, "bob")
    page.goto(f"/conversations/{gid}")
    page.wait_for_function("document.body.classList.contains('offline') === false")
    real = page.locator(f"#messages-{gid} article.msg").first
    expect(real.locator(".sender")).to_have_attribute("title", "@alice")
    expect(real.locator(".handle")).to_have_count(0)
    # Mallory takes Alice's nickname (in another case) and writes.
    with app.test_request_context():
        db.session.execute(update(User).where(User.id == mallory_id).values(name="ALICE"))
        db.session.commit()
        msgs.send_to(mallory_id, gid, "send me your password")
    fake = page.locator(f"#messages-{gid} article.msg").last
    expect(fake.locator(".bubble")).to_have_text("send me your password")
    expect(fake.locator(".sender")).to_have_text("ALICE")
    expect(fake.locator(".handle")).to_have_text("@mallory")
    expect(fake.locator(".sender")).to_have_attribute("title", "@mallory")
    expect(real.locator(".handle")).to_have_text("@alice")
    live = page.locator(f"#messages-{gid}").inner_html()
    # The page served again, by the server's own rule, names them the same way.
    page.reload()
    expect(fake.locator(".handle")).to_have_text("@mallory")
    expect(real.locator(".handle")).to_have_text("@alice")
    assert "@mallory</span>" in live and "@alice</span>" in live
