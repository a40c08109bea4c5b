"""Response headers: the Content-Security-Policy and templates that live within it, HSTS, what caches may keep."""
import io
import os
import re

import pytest
from sqlalchemy import select

from tests.conftest import image_bytes, login_client
from webchat.extensions import db
from webchat.models import Message, User
from webchat.security import content_security_policy
from webchat.services import conversations as convs

HX = {"HX-Request": "true"}
TEMPLATES = os.path.join(os.path.dirname(__file__), os.pardir, "templates")


def directives(response) -> dict[str, list[str]]:
    policy = response.headers["Content-Security-Policy"]
    return {name: values for name, *values in (part.split() for part in policy.split(";") if part.strip())}


@pytest.fixture
def group(app, users):
    """alice's group with bob and carol, holding one image message of alice's; returns (gid, image id)."""
    with app.test_request_context():
        alice = db.session.get(User, users["alice"])
        gid = convs.create_group(alice, "Team", [users["bob"], users["carol"]]).id
    response = login_client(app, "alice").post(
        f"/conversations/{gid}/messages", data={"body": "", "image": (io.BytesIO(image_bytes("PNG")), "p.png")},
        content_type="multipart/form-data")
    assert response.status_code == 303
    with app.app_context():
        return gid, db.session.scalar(select(Message.image_id).where(Message.image_id.is_not(None)))


def test_every_page_carries_a_policy_without_inline_script_or_eval(app, users):
    for response in (app.test_client().get("/auth/login"), login_client(app, "alice").get("/")):
        policy = directives(response)
        assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
        assert policy["default-src"] == ["'self'"] and policy["object-src"] == ["'none'"]
        assert policy["img-src"] == ["'self'", "data:", "blob:"]
        assert policy["connect-src"] == ["'self'", "ws://localhost", "wss://localhost"]
        assert policy["frame-ancestors"] == ["'none'"]
        assert policy["base-uri"] == ["'self'"] and policy["form-action"] == ["'self'"]
        assert "unsafe" not in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("host, connect", [
    ("chat.example.com", "'self' ws://chat.example.com wss://chat.example.com"),
    ("127.0.0.1:8000", "'self' ws://127.0.0.1:8000 wss://127.0.0.1:8000"),
    ("[::1]:8000", "'self' ws://[::1]:8000 wss://[::1]:8000"),
    ("evil; script-src *", "'self'"),  # a Host header cannot write the policy
    ("", "'self'"),
])
def test_the_socket_is_allowed_to_the_sites_own_host_only(host, connect):
    assert f"connect-src {connect};" in content_security_policy(host)


def test_htmx_is_configured_for_the_policy(app, users):
    page = login_client(app, "alice").get("/").get_data(as_text=True)
    config = re.search(r"<meta name=\"htmx-config\" content='([^']+)'>", page).group(1)
    for setting in ('"includeIndicatorStyles":false', '"allowEval":false', '"allowScriptTags":false',
                    '"historyCacheSize":0'):
        assert setting in config


INLINE = [
    (re.compile(r"<script(?![^>]*\ssrc=)[^>]*>", re.I), "an inline <script>"),
    (re.compile(r"<[a-z][^>]*\son[a-z]+\s*=", re.I), "an inline event handler"),
    (re.compile(r"\s(?:data-)?hx-on", re.I), "hx-on"),
    (re.compile(r"[\"']js:", re.I), "a js: attribute value"),
    (re.compile(r"<style", re.I), "an inline <style>"),
    (re.compile(r"\sstyle\s*=", re.I), "a style attribute"),
    (re.compile(r"javascript:", re.I), "a javascript: URL"),
]


def test_no_template_has_inline_script_handlers_or_styles():
    found = []
    for folder, _dirs, files in os.walk(TEMPLATES):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, TEMPLATES)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            for pattern, what in INLINE:
                found += [f"{relative}: {what}: {m.group(0)!r}" for m in pattern.finditer(text)]
    assert not found, "\n".join(found)


def test_the_viewers_own_messages_are_styled_by_a_stylesheet(app, users):
    client = login_client(app, "alice")
    page = client.get("/").get_data(as_text=True)
    href = f'/viewer/{users["alice"]}.css'
    assert f'<link rel="stylesheet" href="{href}">' in page and "<style" not in page
    css = client.get(href)
    assert css.status_code == 200 and css.mimetype == "text/css"
    assert f'.msg[data-sender="{users["alice"]}"]{{flex-direction:row-reverse}}' in css.get_data(as_text=True)
    assert "no-store" not in css.headers["Cache-Control"]


def test_hsts_only_when_the_site_forces_https(app, users):
    assert "Strict-Transport-Security" not in app.test_client().get("/auth/login").headers
    app.config["FORCE_HTTPS"] = True
    try:
        response = app.test_client().get("/auth/login")
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    finally:
        del app.config["FORCE_HTTPS"]


def test_signed_in_pages_and_fragments_are_not_stored(app, group):
    gid, _image = group
    client = login_client(app, "alice")
    for url, headers in (("/", {}), (f"/conversations/{gid}", {}), ("/conversations", HX),
                         (f"/conversations/{gid}?part=head", HX), ("/users/search?q=bo", HX), ("/profile", {})):
        response = client.get(url, headers=headers)
        assert response.status_code == 200 and response.mimetype == "text/html"
        assert response.headers["Cache-Control"] == "no-store", url
    sent = client.post(f"/conversations/{gid}/messages", data={"body": "hi"}, headers=HX)
    assert sent.status_code == 201 and sent.headers["Cache-Control"] == "no-store"
    refused = client.post(f"/conversations/{gid}/messages", data={"body": ""}, headers=HX)
    assert refused.status_code == 422 and refused.headers["Cache-Control"] == "no-store"


def test_static_files_stay_cacheable(app):
    response = app.test_client().get("/static/js/app.js")
    assert response.status_code == 200 and "no-store" not in response.headers.get("Cache-Control", "")


def test_images_are_revalidated_so_a_member_who_left_stops_getting_them(app, group):
    gid, image_id = group
    bob = login_client(app, "bob")
    first = bob.get(f"/images/{image_id}/thumb")
    assert first.status_code == 200
    assert first.headers["Cache-Control"] == "private, no-cache"  # kept, but asked about every time
    etag = first.headers["ETag"]
    again = bob.get(f"/images/{image_id}/thumb", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["ETag"] == etag and not again.data
    assert again.headers["Cache-Control"] == "private, no-cache"
    assert bob.post(f"/conversations/{gid}/leave").status_code == 303
    assert bob.get(f"/images/{image_id}/thumb", headers={"If-None-Match": etag}).status_code == 404
