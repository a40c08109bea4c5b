"""Chat routes: authorization, htmx and plain responses, query budgets, XSS."""
import io
import re

import pytest
from sqlalchemy import func, select

from tests.conftest import image_bytes, login_client, make_user
from webchat.extensions import db
from webchat.models import Conversation, Membership, Message, User
from webchat.services import conversations as convs
from webchat.services import messages as msgs
from webchat.services import conversation_list as lists
from webchat.services import read_state as reads

HX = {"HX-Request": "true"}


@pytest.fixture
def setup(app, users):
    """alice+bob 1:1 with two messages; group owned by alice with bob and carol; dave outside."""
    with app.test_request_context():
        alice, bob, carol = (db.session.get(User, users[n]) for n in ("alice", "bob", "carol"))
        direct = convs.find_or_create_direct(alice, bob)
        m1 = msgs.send_message(alice, direct, "hello bob")[0]
        msgs.send_message(bob, direct, "hi alice")
        group = convs.create_group(alice, "Team", [bob.id, carol.id])
        return {"direct": direct.id, "group": group.id, "m1": m1.id, **users}


def as_user(app, name):
    return login_client(app, name) if name else app.test_client()


# (method, path template, owner-only)
ROUTES = [
    ("get", "/conversations/{cid}", False),
    ("get", "/conversations/{cid}/messages?before={m1}", False),
    ("post", "/conversations/{cid}/messages", False),
    ("post", "/conversations/{cid}/read", False),
    ("post", "/conversations/{cid}/hide", False),
    ("post", "/conversations/{cid}/leave", False),
    ("post", "/conversations/{cid}/members", True),
    ("post", "/conversations/{cid}/members/{bob}/remove", True),
    ("post", "/conversations/{cid}/settings", True),
    ("post", "/conversations/{cid}/disband", True),
]


@pytest.mark.parametrize("method, path, owner_only", ROUTES)
def test_anonymous_is_sent_to_login(app, setup, method, path, owner_only):
    client = app.test_client()
    url = path.format(cid=setup["group"], **setup)
    response = getattr(client, method)(url, **({"csrf": False} if method == "post" else {}))
    # Anonymous POSTs without a token fail CSRF first (400; with a token, see the next test);
    # GETs redirect to sign in, or get 401 from htmx.
    if method == "get":
        assert response.status_code in (302, 303) and "/auth/login" in response.headers["Location"]
    else:
        assert response.status_code == 400
    anon_htmx = getattr(client, method)(url, headers=HX, **({"csrf": False} if method == "post" else {}))
    assert anon_htmx.status_code == (401 if method == "get" else 400)


@pytest.mark.parametrize("method, path, owner_only", [r for r in ROUTES if r[0] == "post"])
def test_anonymous_post_with_a_valid_token_is_sent_to_login(app, setup, method, path, owner_only):
    client = app.test_client()
    url = path.format(cid=setup["group"], **setup)
    token = client.csrf_token()  # an anonymous session's own token: CSRF passes, sign-in does not
    response = client.post(url, data={"csrf_token": token, "body": "x"})
    assert response.status_code in (302, 303) and "/auth/login" in response.headers["Location"]
    assert client.post(url, data={"csrf_token": token, "body": "x"}, headers=HX).status_code == 401


@pytest.mark.parametrize("method, path, owner_only", ROUTES)
def test_non_member_gets_404(app, setup, method, path, owner_only):
    client = as_user(app, "dave")
    url = path.format(cid=setup["group"], **setup)
    response = getattr(client, method)(url, data={"body": "x", "member_ids": [setup["dave"]], "name": "n"}) \
        if method == "post" else client.get(url)
    assert response.status_code == 404
    assert "Team" not in response.get_data(as_text=True)


@pytest.mark.parametrize("method, path, owner_only", [r for r in ROUTES if r[2]])
def test_member_who_is_not_owner_gets_403(app, setup, method, path, owner_only):
    client = as_user(app, "carol")
    url = path.format(cid=setup["group"], **setup)
    response = client.post(url, data={"member_ids": [setup["dave"]], "name": "mine"})
    assert response.status_code == 403
    with app.app_context():
        assert db.session.get(Conversation, setup["group"]).name == "Team"


def test_owner_actions(app, setup):
    client = as_user(app, "alice")
    gid = setup["group"]
    assert client.post(f"/conversations/{gid}/members", data={"usernames": "dave"}).status_code == 303
    assert client.post(f"/conversations/{gid}/members/{setup['bob']}/remove").status_code == 303
    assert client.post(f"/conversations/{gid}/settings", data={"name": "Renamed"}).status_code == 303
    with app.app_context():
        members = set(db.session.scalars(select(Membership.user_id).where(Membership.conversation_id == gid)))
        assert members == {setup["alice"], setup["carol"], setup["dave"]}
        assert db.session.get(Conversation, gid).name == "Renamed"
    response = client.post(f"/conversations/{gid}/disband")
    assert response.status_code == 303 and response.headers["Location"] == "/"
    with app.app_context():
        assert db.session.get(Conversation, gid) is None


def test_add_unknown_username_is_a_clear_422(app, setup):
    client = as_user(app, "alice")
    response = client.post(f"/conversations/{setup['group']}/members", data={"usernames": "ghost"})
    assert response.status_code == 422
    assert "No user called ghost" in response.get_data(as_text=True)


def test_member_can_read_send_hide_and_leave(app, setup):
    client = as_user(app, "carol")
    gid = setup["group"]
    assert client.get(f"/conversations/{gid}").status_code == 200
    assert client.post(f"/conversations/{gid}/messages", data={"body": "carol here"}).status_code == 303
    assert client.post(f"/conversations/{gid}/read").status_code == 303
    assert client.post(f"/conversations/{gid}/hide").status_code == 303
    assert f"conversation-{gid}" not in client.get("/").get_data(as_text=True)
    assert client.post(f"/conversations/{gid}/leave").status_code == 303
    assert client.get(f"/conversations/{gid}").status_code == 404


def test_start_direct_conversation_by_id_or_username(app, setup):
    alice = as_user(app, "alice")
    bob = as_user(app, "bob")
    first = alice.post("/conversations", data={"user_id": setup["bob"]})
    second = bob.post("/conversations", data={"username": "ALICE"})
    assert first.status_code == second.status_code == 303
    assert first.headers["Location"] == second.headers["Location"] == f"/conversations/{setup['direct']}"
    assert alice.post("/conversations", data={"username": "ghost"}).status_code == 404


def test_a_refused_image_says_so_to_the_page_and_other_refusals_do_not(app, setup):
    client = as_user(app, "alice")
    bad = client.post(f"/conversations/{setup['direct']}/messages", headers=HX, content_type="multipart/form-data",
                      data={"body": "look", "image": (io.BytesIO(b"not an image"), "x.png")})
    assert bad.status_code == 400 and "not a PNG" in bad.get_data(as_text=True)
    assert bad.headers.get("HX-Trigger") == "image-refused"  # the page takes the attachment off
    too_long = client.post(f"/conversations/{setup['direct']}/messages", headers=HX, data={"body": "x" * 4001})
    assert too_long.status_code == 422 and "HX-Trigger" not in too_long.headers


def test_create_group_route(app, setup):
    client = as_user(app, "dave")
    response = client.post("/conversations", data={"name": "Dave's", "member_ids": [setup["bob"], setup["carol"]],
                                                   "image": (io.BytesIO(image_bytes()), "g.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 303
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Dave&#39;s" in page and "Dave created the group" in page
    too_few = client.post("/conversations", data={"name": "x", "member_ids": [setup["bob"]]})
    assert too_few.status_code == 422 and "at least 2" in too_few.get_data(as_text=True)


def test_a_refused_group_comes_back_as_it_was_filled_in(app, setup):
    """Dave has no 1:1s: the people he picked come back from their ids, still ticked, with the name."""
    client = as_user(app, "dave")
    response = client.post("/conversations", data={"name": "Trip <3", "member_ids": [setup["bob"]]})
    html = response.get_data(as_text=True)
    assert response.status_code == 422
    assert 'id="group-form"' in html and "Pick at least 2 other people" in html
    assert re.search(r'id="group-name"[^>]*value="Trip &lt;3"', html)
    assert re.search(r'value="%d" checked' % setup["bob"], html)
    assert f'value="{setup["carol"]}"' not in html  # not picked, not a contact of Dave's
    # Ids that are not people are refused, and left out of the form shown again.
    response = client.post("/conversations", data={"name": "Trip", "member_ids": [setup["bob"], "junk", 2**40]})
    html = response.get_data(as_text=True)
    assert response.status_code == 422 and "Some of those people do not exist." in html
    assert re.search(r'value="%d" checked' % setup["bob"], html) and "junk" not in html


def test_send_over_htmx_answers_201_with_the_fragment(app, setup):
    client = as_user(app, "alice")
    response = client.post(f"/conversations/{setup['direct']}/messages", data={"body": "frag", "client_id": "k1"},
                           headers=HX)
    assert response.status_code == 201
    html = response.get_data(as_text=True)
    assert "<html" not in html and re.search(r'id="message-\d+"', html)
    again = client.post(f"/conversations/{setup['direct']}/messages", data={"body": "frag", "client_id": "k1"},
                        headers=HX)
    assert again.status_code == 200
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Message).where(Message.body == "frag")) == 1


@pytest.mark.parametrize("data, status", [({"body": ""}, 422), ({"body": "  "}, 422), ({"body": "y" * 4001}, 422),
                                          ({"body": "ok", "client_id": "z" * 65}, 422)])
def test_bad_message_is_a_clear_4xx(app, setup, data, status):
    client = as_user(app, "alice")
    response = client.post(f"/conversations/{setup['direct']}/messages", data=data)
    assert response.status_code == status
    htmx = client.post(f"/conversations/{setup['direct']}/messages", data=dict(data), headers=HX)
    assert htmx.status_code == status and htmx.headers["HX-Retarget"] == "#flash"


def test_a_non_members_image_is_refused_before_it_is_decoded(app, setup, monkeypatch):
    from webchat.models import Image
    from webchat.services import images

    decoded = []
    real = images.encode_image
    monkeypatch.setattr(images, "encode_image", lambda data: decoded.append(1) or real(data))
    response = as_user(app, "dave").post(f"/conversations/{setup['direct']}/messages",
                                         data={"body": "x", "image": (io.BytesIO(image_bytes("JPEG")), "p.jpg")},
                                         content_type="multipart/form-data")
    assert response.status_code == 404 and decoded == []
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Image)) == 0
    # A member's upload goes through the same decoding (so the check above can fail).
    ok = as_user(app, "alice").post(f"/conversations/{setup['direct']}/messages",
                                    data={"body": "", "image": (io.BytesIO(image_bytes("JPEG")), "p.jpg")},
                                    content_type="multipart/form-data")
    assert ok.status_code == 303 and decoded == [1]


def test_image_message_and_membership_checked_serving(app, setup):
    client = as_user(app, "alice")
    response = client.post(f"/conversations/{setup['direct']}/messages",
                           data={"body": "", "image": (io.BytesIO(image_bytes("JPEG")), "p.jpg")},
                           content_type="multipart/form-data")
    assert response.status_code == 303
    with app.app_context():
        image_id = db.session.scalar(select(Message.image_id).where(Message.image_id.is_not(None)))
    assert client.get(f"/images/{image_id}").status_code == 200
    assert client.get(f"/images/{image_id}/thumb").status_code == 200
    assert as_user(app, "dave").get(f"/images/{image_id}").status_code == 404
    assert app.test_client().get(f"/images/{image_id}").status_code in (302, 303)
    bad = client.post(f"/conversations/{setup['direct']}/messages",
                      data={"body": "", "image": (io.BytesIO(b"MZ\x90\x00 not an image"), "p.png")},
                      content_type="multipart/form-data")
    assert bad.status_code == 400


def test_older_messages_fragment(app, setup):
    client = as_user(app, "alice")
    with app.test_request_context():
        alice = db.session.get(User, setup["alice"])
        direct = db.session.get(Conversation, setup["direct"])
        for i in range(60):
            msgs.send_message(alice, direct, f"n{i}")
    page = client.get(f"/conversations/{setup['direct']}").get_data(as_text=True)
    assert page.count('class="msg"') == 50 and "load-older" in page
    oldest_shown = int(re.search(r'id="message-(\d+)"', page).group(1))
    fragment = client.get(f"/conversations/{setup['direct']}/messages?before={oldest_shown}", headers=HX)
    assert fragment.status_code == 200
    assert fragment.get_data(as_text=True).count('class="msg"') == 12
    assert client.get(f"/conversations/{setup['direct']}/messages?before=999999", headers=HX).status_code == 404
    assert client.get(f"/conversations/{setup['direct']}/messages?before=abc", headers=HX).status_code == 400


def test_opening_marks_read_and_title_shows_total(app, setup):
    alice = as_user(app, "alice")
    index = alice.get("/").get_data(as_text=True)
    # bob answered "hi alice" (1 unread for alice); bob's own reply marked alice's message read for him.
    assert re.search(rf'id="unread-{setup["direct"]}" class="badge" >1<', index)
    assert "<title data-base=\"webchat\">(1) webchat</title>" in index
    assert re.search(rf'id="unread-{setup["direct"]}" class="badge" hidden>', as_user(app, "bob").get("/").text)
    alice.get(f"/conversations/{setup['direct']}")
    index = alice.get("/").get_data(as_text=True)
    assert re.search(rf'id="unread-{setup["direct"]}" class="badge" hidden>', index)


def test_user_search_fragment(app, setup):
    client = as_user(app, "alice")
    html = client.get("/users/search?q=ca", headers=HX).get_data(as_text=True)
    assert f'data-user-id="{setup["carol"]}"' in html and 'data-username="carol"' in html
    assert "<html" not in html
    assert 'data-username="alice"' not in client.get("/users/search?q=ali", headers=HX).get_data(as_text=True)


XSS = '<script>alert(1)</script><img src=x onerror=alert(2)>"\'&'


def test_xss_payloads_are_inert(app, setup):
    with app.test_request_context():
        evil = make_user("mallory", name=XSS)
        alice = db.session.get(User, setup["alice"])
        group = convs.create_group(evil, XSS, [alice.id, setup["bob"]])
        msgs.send_message(evil, group, XSS + " javascript:alert(3) http://ok.example/?a=<b>")
        gid = group.id
    client = as_user(app, "alice")
    for url, headers in (("/", {}), (f"/conversations/{gid}", {}), ("/conversations", HX), ("/users/search?q=mall", {})):
        html = client.get(url, headers=headers).get_data(as_text=True)
        assert "<script>alert(1)" not in html
        assert "<img src=x" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    chat = client.get(f"/conversations/{gid}").get_data(as_text=True)
    assert 'href="javascript:' not in chat
    # The link stops at "<"; the rest is escaped text.
    assert '<a href="http://ok.example/?a="' in chat and "&lt;b&gt;" in chat


@pytest.mark.parametrize("url, headers", [("/", {}), ("/conversations", HX)])
@pytest.mark.parametrize("n", [5, 200])
def test_list_page_query_count_is_constant(app, users, count_queries, n, url, headers):
    with app.test_request_context():
        alice = db.session.get(User, users["alice"])
        for i in range(n - 1):
            other = make_user(f"peer{i:03d}")
            conversation = convs.find_or_create_direct(alice, other)
            msgs.send_message(other, conversation, "hi")
        convs.create_group(alice, "With a system line last", [users["bob"], users["carol"]])
    client = login_client(app, "alice")
    counter = count_queries()
    with counter:
        response = client.get(url, headers=headers)
    assert response.status_code == 200
    assert response.get_data(as_text=True).count('class="conv-row"') == min(n, lists.LIST_PAGE)
    # user, rows with their unread counts, peers, system last lines (last_seen is touched at most
    # every 5 minutes)
    assert counter.count == 4, counter.statements


def test_the_list_continues_page_by_page(app, users):
    with app.test_request_context():
        alice = db.session.get(User, users["alice"])
        for i in range(lists.LIST_PAGE + 3):
            other = make_user(f"q{i:03d}")
            msgs.send_message(other, convs.find_or_create_direct(alice, other), f"hi {i}")
    client = login_client(app, "alice")
    page = client.get("/").get_data(as_text=True)
    first = re.findall(r'id="conversation-(\d+)" class="conv-row"', page)
    assert len(first) == lists.LIST_PAGE
    more = re.search(r'id="conversation-list-more".*?href="([^"]+)"', page, re.S).group(1).replace("&amp;", "&")
    rest = client.get(more, headers=HX)
    assert rest.status_code == 200
    body = rest.get_data(as_text=True)
    second = re.findall(r'id="conversation-(\d+)" class="conv-row"', body)
    assert len(second) == 3 and not set(first) & set(second)
    assert "conversation-list-more" not in body and "<html" not in body
    # Without JavaScript the same link is a whole page holding the rest of the list.
    plain = client.get(more).get_data(as_text=True)
    assert "<html" in plain and re.findall(r'id="conversation-(\d+)" class="conv-row"', plain) == second
    bad = client.get("/?before=nonsense", headers=HX)
    assert bad.status_code == 400 and "That page of the list does not exist." in bad.get_data(as_text=True)


@pytest.mark.parametrize("n", [5, 200])
def test_chat_page_query_count_is_constant(app, users, count_queries, n):
    with app.test_request_context():
        alice, bob = db.session.get(User, users["alice"]), db.session.get(User, users["bob"])
        group = convs.create_group(alice, "G", [bob.id, users["carol"]])
        for i in range(n):  # bob's last: alice has something to mark read
            msgs.send_message(bob if (n - i) % 2 else alice, group, f"m{i}")
        gid = group.id
    client = login_client(app, "alice")
    counter = count_queries()
    with counter:
        response = client.get(f"/conversations/{gid}")
    assert response.status_code == 200
    # user, conversation+membership, newest message id, mark read, messages, members (the list
    # comes by a request of its own; nothing is read back after the commit); on PostgreSQL the
    # read first takes the conversation's lock (conversations.lock_conversations)
    assert counter.count == (7 if _is_pg(app) else 6), "\n".join(s[:90] for s in counter.statements)


def test_the_chat_page_leaves_the_list_to_a_request_of_its_own(app, setup):
    with app.test_request_context():
        bob = db.session.get(User, setup["bob"])
        group = db.session.get(Conversation, setup["group"])
        newest = msgs.send_message(bob, group, "newer than anything in the 1:1")[0].id
    client = as_user(app, "alice")
    chat = client.get(f"/conversations/{setup['direct']}").get_data(as_text=True)
    assert 'class="conv-row"' not in chat
    assert re.search(r'id="conversation-list"[^>]*data-loading[^>]*hx-get="/conversations"', chat)
    # The socket asks for what came after the newest message of all the user's conversations,
    # not only this one's: the list the page fetches next already shows the group's message.
    assert f'data-newest="{newest}"' in chat
    rows = client.get("/conversations", headers=HX)
    body = rows.get_data(as_text=True)
    assert rows.status_code == 200 and "<html" not in body and "data-loading" not in body
    assert re.findall(r'id="conversation-(\d+)" class="conv-row"', body) == [str(setup["group"]), str(setup["direct"])]
    assert re.search(rf'id="unread-{setup["group"]}" class="badge"\s*>1<', body)  # bob's: system lines are not unread
    # Without JavaScript the same address is the list page.
    plain = client.get("/conversations").get_data(as_text=True)
    assert "<html" in plain and plain.count('class="conv-row"') == 2
    anonymous = app.test_client().get("/conversations", headers=HX)
    assert anonymous.status_code == 401


def test_opening_a_read_conversation_again_writes_nothing(app, users, count_queries):
    with app.test_request_context():
        alice, bob = db.session.get(User, users["alice"]), db.session.get(User, users["bob"])
        direct = convs.find_or_create_direct(alice, bob)
        msgs.send_message(bob, direct, "unread")
        cid = direct.id
    client = login_client(app, "alice")
    first, again = count_queries(), count_queries()
    with first:
        assert client.get(f"/conversations/{cid}").status_code == 200
    with again:
        assert client.get(f"/conversations/{cid}").status_code == 200
    assert any(s.lstrip().upper().startswith("UPDATE UNREADS") for s in first.statements)
    # Already read that far: no lock, no update (the pointer came with the conversation's row).
    assert not any(s.lstrip().upper().startswith("UPDATE") or "FOR SHARE" in s.upper() for s in again.statements)
    assert again.count < first.count
    with app.test_request_context():
        assert reads.unread_counts(users["alice"]) == {}


@pytest.mark.parametrize("method, url, data", [
    ("get", "/conversations/9999999999", None),
    ("get", "/conversations/99999999999999999999999", None),
    ("post", "/conversations", {"user_id": "99999999999"}),
    ("post", "/conversations", {"name": "G", "member_ids": ["99999999999999999999999", "2"]}),
    ("get", "/users/search?q=a%00b", None),
    ("post", "/conversations", {"username": "a\x00"}),
    ("post", "/conversations/{direct}/messages", {"body": "hi\x00there"}),
    ("get", "/conversations/{direct}/messages?before=99999999999999999999999", None),
    ("post", "/conversations/{group}/members/99999999999/remove", {}),
])
def test_out_of_range_ids_and_nul_bytes_are_4xx_not_500(app, setup, method, url, data):
    client = as_user(app, "alice")
    url = url.format(**setup)
    response = client.get(url, headers=HX if "before" in url else {}) if method == "get" \
        else client.post(url, data=data)
    assert 400 <= response.status_code < 500, (response.status_code, response.get_data(as_text=True)[:300])


def test_login_with_nul_byte_is_400(client, users):
    response = client.post("/auth/login", data={"username": "ali\x00ce", "password": "password123"})
    assert response.status_code == 400


def test_signed_out_session_cookie_is_refused_over_http(app, setup):
    client = login_client(app, "alice")
    token = client.csrf_token()  # a token of that session, as a page in the copied browser holds
    saved = client.get_cookie("session").value
    client.post("/auth/logout")
    thief = app.test_client()
    # Sending reads no user row, and is refused all the same.
    thief.set_cookie("session", saved)
    response = thief.post(f"/conversations/{setup['direct']}/messages",
                          data={"body": "with a copy", "csrf_token": token})
    assert response.status_code == 303 and "/auth/login" in response.headers["Location"]
    with app.app_context():
        assert db.session.scalar(select(func.count()).where(Message.body == "with a copy")) == 0
    thief.set_cookie("session", saved)
    assert thief.get("/").status_code in (302, 303)


def test_htmx_page_requests_get_fragments(app, setup):
    client = as_user(app, "alice")
    for url in ("/", f"/conversations/{setup['direct']}", "/profile"):
        html = client.get(url, headers=HX).get_data(as_text=True)
        assert "<html" not in html and "<head>" not in html and "<!doctype" not in html, url
    assert 'id="conversation-list"' in client.get("/", headers=HX).get_data(as_text=True)


def _is_pg(app) -> bool:
    with app.app_context():
        return db.engine.dialect.name == "postgresql"


def test_a_send_reads_no_user_row(app, setup, count_queries):
    client = login_client(app, "alice")  # signing in writes "last seen": the send does not
    token = client.csrf_token()  # (the test client fetches it from a page otherwise)
    counter = count_queries()
    with counter:
        response = client.post(f"/conversations/{setup['direct']}/messages",
                               data={"body": "no row", "csrf_token": token}, headers=HX)
    assert response.status_code == 201 and "no row" in response.get_data(as_text=True)
    listing = "\n".join(s[:150] for s in counter.statements)
    assert not [s for s in counter.statements if re.search(r"FROM users\s+WHERE users\.id = ", s)], listing
    # The signed-in session's row with its user (server-side sessions, one indexed query), then on
    # PostgreSQL one call of webchat_send() (membership, active account, writes, members' states).
    assert counter.count == (2 if _is_pg(app) else 6), listing


@pytest.mark.parametrize("headers, status", [({}, 303), (HX, 401)])
def test_a_disabled_account_cannot_send_with_its_old_cookie(app, setup, headers, status):
    client = login_client(app, "bob")
    with app.app_context():
        db.session.get(User, setup["bob"]).is_disabled = True
        db.session.commit()
    response = client.post(f"/conversations/{setup['direct']}/messages", data={"body": "after disabling"},
                           headers=headers)
    assert response.status_code == status
    if status == 303:
        assert "/auth/login" in response.headers["Location"]
    with app.app_context():
        assert db.session.scalar(select(func.count()).where(Message.body == "after disabling")) == 0


def test_last_seen_is_written_at_most_once_in_five_minutes(app, setup, count_queries):
    from datetime import timedelta

    from sqlalchemy import update

    from webchat.models import UserSession, utcnow

    client = login_client(app, "carol")
    token = client.csrf_token()
    with app.app_context():  # as if signed in long ago
        db.session.execute(update(UserSession).values(last_seen_at=utcnow() - timedelta(minutes=6)))
        db.session.commit()
    counter = count_queries()
    with counter:
        for _ in range(3):
            assert client.post(f"/conversations/{setup['group']}/messages",
                               data={"body": "hi", "csrf_token": token}).status_code == 303
    seen = [s for s in counter.statements if s.lstrip().upper().startswith("UPDATE USERS")]
    assert len(seen) == 1, counter.statements
    # The hook runs for any cookie with a user id; the write leaves a disabled account alone.
    with app.app_context():
        from webchat.services.accounts import mark_seen

        db.session.get(User, setup["dave"]).is_disabled = True
        db.session.commit()
        before = db.session.get(User, setup["dave"]).last_seen_at
        mark_seen(setup["dave"])
        db.session.expire_all()
        assert db.session.get(User, setup["dave"]).last_seen_at == before


def test_the_chat_head_alone_reads_nothing_as_read(app, setup):
    """After a group change an open page fetches its header: that must not mark the group read."""
    with app.test_request_context():
        carol = db.session.get(User, setup["carol"])
        msgs.send_message(carol, db.session.get(Conversation, setup["group"]), "unread for bob")
    bob = as_user(app, "bob")
    response = bob.get(f"/conversations/{setup['group']}?part=head", headers=HX)
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and html.lstrip().startswith("<header") and "<html" not in html
    assert 'id="member-list"' in html and "Team" in html and 'id="messages-' not in html
    with app.test_request_context():
        assert reads.unread_counts(setup["bob"]) == {setup["group"]: 1}
    assert as_user(app, "dave").get(f"/conversations/{setup['group']}?part=head", headers=HX).status_code == 404
    # Without htmx it is the page, which marks read as always.
    assert bob.get(f"/conversations/{setup['group']}?part=head").status_code == 200
    with app.test_request_context():
        assert reads.unread_counts(setup["bob"]) == {}


def test_a_non_owner_is_refused_before_any_username_is_looked_up(app, setup, count_queries):
    client = as_user(app, "carol")
    client.get("/")  # sign-in's own writes are done
    counter = count_queries()
    with counter:
        response = client.post(f"/conversations/{setup['group']}/members", data={"usernames": "ghost dave"})
    assert response.status_code == 403
    assert "No user called" not in response.get_data(as_text=True)
    assert not [s for s in counter.statements if "lower(users.username) IN" in s]


@pytest.mark.parametrize("data", [
    {"usernames": " ".join(f"u{i}" for i in range(70_000))},
    {"usernames": ",".join(f"u{i}" for i in range(201))},
    {"member_ids": [str(i) for i in range(1, 70_001)]},
    {"member_ids": ["1"] * 201},
])
def test_naming_too_many_people_at_once_is_a_clear_422(app, setup, data):
    client = as_user(app, "alice")
    for headers in ({}, HX):
        response = client.post(f"/conversations/{setup['group']}/members", data=data, headers=headers)
        assert response.status_code == 422
        assert "Name at most 200 people at once." in response.get_data(as_text=True)


def test_200_usernames_are_one_query_and_repeats_count_once(app, setup, count_queries):
    from webchat.services import people

    with app.test_request_context():
        counter = count_queries()
        with counter:
            assert people.ids_for_usernames("dave " * 500 + "DAVE,Dave") == [setup["dave"]]
            with pytest.raises(Exception, match="No user called u0"):
                people.ids_for_usernames(" ".join(f"u{i}" for i in range(199)) + " dave")
        assert counter.count == 2


@pytest.fixture
def impostor(app, setup):
    """mallory, nicknamed "alice" like Alice, joins the group and writes in it; returns her id."""
    with app.test_request_context():
        mallory = make_user("mallory", name="ALICE")
        alice = db.session.get(User, setup["alice"])
        group = db.session.get(Conversation, setup["group"])
        convs.add_members(alice, group, [mallory.id])
        msgs.send_message(alice, group, "from the real one")
        msgs.send_message(mallory, group, "send me your password")
        return mallory.id


def test_look_alike_nicknames_show_their_usernames(app, setup, impostor):
    page = as_user(app, "bob").get(f"/conversations/{setup['group']}").get_data(as_text=True)
    for uid, username in ((setup["alice"], "alice"), (impostor, "mallory")):
        message = re.search(rf'<article class="msg" id="message-\d+" data-mid="\d+" data-sender="{uid}">.*?</article>',
                            page, re.S).group(0)
        assert f'title="@{username}"' in message and f'<span class="handle">@{username}</span>' in message
    # Carol's nickname is her own: her @username is only its title.
    with app.test_request_context():
        msgs.send_message(db.session.get(User, setup["carol"]), db.session.get(Conversation, setup["group"]), "hey")
    page = as_user(app, "bob").get(f"/conversations/{setup['group']}").get_data(as_text=True)
    carol = re.search(rf'data-sender="{setup["carol"]}">.*?</article>', page, re.S).group(0)
    assert 'title="@carol"' in carol and "@carol</span>" not in carol
    # The members' list names everyone by username, and the header knows everyone for the page's script.
    assert '<bdi>ALICE</bdi> <small class="handle muted">@mallory</small>' in page
    assert f'"{impostor}": ["mallory", "alice"]' in page


def test_user_text_is_isolated_from_what_surrounds_it(app, setup):
    rlo = "\u202e"
    with app.test_request_context():
        mallory = make_user("mallory", name=f"exe.{rlo}txt")  # a name written before names lost them
        alice = db.session.get(User, setup["alice"])
        direct = convs.find_or_create_direct(alice, mallory)
        msgs.send_message(mallory, direct, f"see {rlo}fdp.exe")
        cid = direct.id
    client = as_user(app, "alice")
    chat = client.get(f"/conversations/{cid}").get_data(as_text=True)
    assert f'<bdi class="sender" data-name-key="exe.txt" title="@mallory">exe.{rlo}txt</bdi>' in chat
    assert f'<div class="bubble" dir="auto">see {rlo}fdp.exe</div>' in chat
    assert f'<h1 id="chat-title"><bdi title="@mallory">exe.{rlo}txt</bdi></h1>' in chat
    rows = client.get("/conversations", headers=HX).get_data(as_text=True)
    assert f'<bdi class="conv-name">exe.{rlo}txt</bdi>' in rows
    assert f"<bdi>see {rlo}fdp.exe</bdi>" in rows
