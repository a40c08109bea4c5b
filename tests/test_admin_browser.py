"""Admin pages in Chromium: sign in, disable a user, delete a conversation."""
from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from tests.support import csrf_of
from webchat.extensions import db
from webchat.models import AuditLog, Conversation, User


@pytest.mark.browser
@pytest.mark.processes
def test_admin_disables_a_user_and_deletes_a_conversation(app, users, live_server, browser):
    from playwright.sync_api import expect

    from webchat.services.accounts import register_user
    from webchat.services.conversations import create_group

    with app.test_request_context():
        register_user("root", "password123", is_admin=True)
        alice = db.session.get(User, users["alice"])
        cid = create_group(alice, "Weekend plans", [users["bob"], users["carol"]]).id
    bob = users["bob"]

    page = browser.new_page(base_url=live_server.url)
    dialogs: list[str] = []

    def accept(dialog):
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    try:
        page.goto("/auth/login?next=/admin/")
        page.fill("#login-username", "root")
        page.fill("#login-password", "password123")
        page.press("#login-password", "Enter")
        expect(page.locator("#admin-stats")).to_be_visible()

        page.click("#admin-nav-users")
        page.fill("#admin-user-q", "bob")
        page.press("#admin-user-q", "Enter")
        expect(page.locator(f"#user-row-{bob}")).to_be_visible()
        page.click(f"#disable-user-{bob} button")
        expect(page.locator(f"#user-status-{bob}")).to_contain_text("disabled")
        expect(page.locator(f"#enable-user-{bob}")).to_be_visible()
        assert page.url.endswith("/admin/users?q=bob")

        page.click("#admin-nav-conversations")
        expect(page.locator(f"#admin-conversation-row-{cid}")).to_contain_text("Weekend plans")
        page.click(f"#delete-conversation-{cid} button")
        expect(page.locator(f"#admin-conversation-row-{cid}")).to_have_count(0)
        expect(page.locator("#admin-conversation-total")).to_have_text("0 conversations")

        page.click("#admin-nav-dashboard")
        expect(page.locator("#audit-log")).to_contain_text("disabled user")
        expect(page.locator("#audit-log")).to_contain_text("deleted conversation")
    finally:
        page.close()

    # Both destructive actions asked first.
    assert len(dialogs) == 2 and "bob" in dialogs[0] and "Weekend plans" in dialogs[1]
    with app.app_context():
        assert db.session.get(User, bob).is_disabled
        assert db.session.get(Conversation, cid) is None
        assert db.session.scalars(select(AuditLog.action).order_by(AuditLog.id)).all() == [
            "disable_user", "delete_conversation"]
    # bob cannot sign in any more.
    with httpx.Client(base_url=live_server.url, timeout=10) as anonymous:
        response = anonymous.post("/auth/login", data={"username": "bob", "password": "password123",
                                                       "csrf_token": csrf_of(anonymous, "/auth/login")})
    assert response.status_code == 401
