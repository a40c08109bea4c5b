"""Chat views: parse the request, call one service, render."""
from __future__ import annotations

from flask import Response, abort, current_app, make_response, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from ..extensions import login_manager
from ..models import User
from ..services import AccountClosed, DomainError, ImageRefused, people
from ..services import conversation_list as lists
from ..services import conversations as convs
from ..services import history
from ..services import messages as msgs
from ..services.images import image_for
from ..services.membership import get_conversation_for
from ..services.read_state import mark_read
from ..services.text_rules import name_key
from ..web import is_htmx, refusal, signed_in_user_id
from . import bp


@bp.app_template_filter("name_key")
def name_key_filter(name: str | None) -> str:
    """What the page compares nicknames by (services.text_rules.name_key), for messages and members."""
    return name_key(name)


def _fail(exc: DomainError, page=None, **context):
    """Refuse with the page re-rendered around the message (see webchat.refusal)."""
    return refusal(exc, (lambda error: page(error=error, **context)) if page else None)


def _me() -> User:
    return current_user._get_current_object()


def _index_page(error: str | None = None, results=None, q: str = "", before: str | None = None):
    rows, next_cursor = lists.conversation_page(current_user.id, before)
    return render_template("chat/index.html", rows=rows, next_cursor=next_cursor, error=error, results=results,
                           q=q, newest_id=max((r.conversation.last_message_id or 0 for r in rows), default=0),
                           total_unread=sum(r.unread for r in rows))


@bp.get("/")
@login_required
def index():
    """Show the conversation list, a page at a time (`before` continues it; htmx gets just the rows)."""
    q = request.args.get("q", "").strip()
    before = request.args.get("before")
    try:
        if before is not None and is_htmx():
            rows, next_cursor = lists.conversation_page(current_user.id, before)
            return render_template("chat/_conversation_rows.html", rows=rows, next_cursor=next_cursor)
        results = people.search_users(q, current_user.id) if q else None
        return _index_page(results=results, q=q, before=before)
    except DomainError as exc:
        return _fail(exc, _index_page)


@bp.get("/conversations")
@login_required
def conversations():
    """Return the first page of the conversation list for htmx (the chat page loads it so)."""
    if not is_htmx():
        return _index_page()
    rows, next_cursor = lists.conversation_page(current_user.id)
    return render_template("chat/_conversation_list.html", rows=rows, next_cursor=next_cursor)


@bp.get("/users/search")
@login_required
def search_users():
    """List users matching a username or nickname."""
    q = request.args.get("q", "")
    users = people.search_users(q, current_user.id)
    if is_htmx():
        return render_template("chat/_user_results.html", users=users, q=q, pick=request.args.get("pick") == "1")
    return _index_page(results=users, q=q)


@bp.get("/conversations/new")
@login_required
def new_group():
    """Show the form to create a group."""
    return _new_group_page(q=request.args.get("q", "").strip())


def _new_group_page(error: str | None = None, q: str = "", name: str = "", picked=()):
    """The new-group form: one's 1:1 contacts, the search's people, and (after a refusal) what was filled in."""
    offered, picked_ids = people.group_form_people(current_user.id, q, picked)
    return render_template("chat/new_group.html", people=offered, q=q, error=error, name=name, picked=picked_ids)


@bp.post("/conversations")
@login_required
def create_conversation():
    """Open the 1:1 conversation with a user, or create a group."""
    me = _me()
    is_group = request.form.get("name") is not None or bool(request.form.getlist("member_ids"))
    try:
        if is_group:
            conversation = convs.create_group(me, request.form.get("name", ""), request.form.getlist("member_ids"),
                                              request.files.get("image"))
        else:
            conversation = convs.start_direct(me, request.form.get("user_id"), request.form.get("username"))
    except DomainError as exc:
        if is_group:  # the form again, as it was filled in (a file input cannot be refilled)
            return _fail(exc, _new_group_page, name=request.form.get("name", ""),
                         picked=request.form.getlist("member_ids"))
        return _fail(exc, _index_page)
    target = url_for("chat.conversation", cid=conversation.id)
    if is_htmx():
        return Response(status=204, headers={"HX-Redirect": target})
    return redirect(target, 303)


def _chat_head(cid):
    """The header alone, for an open page after a group change: no messages, nothing marked read."""
    conversation, _membership = get_conversation_for(current_user.id, cid)
    return render_template("chat/_chat_head.html", **vars(convs.chat_header(current_user.id, conversation)))


def _chat_page(cid, error: str | None = None, before=None):
    view = convs.open_conversation(current_user.id, cid, before)
    # The list is not here: the page fetches it with a request of its own (chat.conversations),
    # which keeps opening a conversation as fast at 500 conversations as at 5.
    return render_template(
        "chat/conversation.html", membership=view.membership, messages=view.messages, error=error,
        has_older=view.has_older, newest_id=view.newest_id, labels=view.labels,
        retention_days=current_app.config["RETENTION_DAYS"],
        **vars(view.header),
    )


@bp.get("/conversations/<int:cid>")
@login_required
def conversation(cid: int):
    """Show a conversation's newest messages and mark it read (`part=head` over htmx: its header alone)."""
    try:
        if request.args.get("part") == "head" and is_htmx():
            return _chat_head(cid)
        return _chat_page(cid)
    except DomainError as exc:
        return _fail(exc)


@bp.get("/conversations/<int:cid>/messages")
@login_required
def older_messages(cid: int):
    """Return up to 50 messages older than `before`."""
    try:
        conversation, _m = get_conversation_for(current_user.id, cid)
        before = request.args.get("before")
        if not is_htmx():
            return _chat_page(cid, before=before)
        messages = history.messages_page(conversation.id, before=before)
    except DomainError as exc:
        return _fail(exc)
    return render_template("chat/_older.html", conversation=conversation, messages=messages,
                           has_older=len(messages) == history.PAGE_SIZE)


@bp.post("/conversations/<int:cid>/messages")
def send(cid: int):
    """Send a text and/or image message.

    The busiest route reads no user row: the sender's id comes from the session (signed-out
    copies were refused before this), and the send itself checks that the sender is an active
    member (one statement on PostgreSQL).
    """
    user_id = signed_in_user_id()
    if user_id is None:
        return login_manager.unauthorized()
    try:
        message, created = msgs.send_to(user_id, cid, request.form.get("body"),
                                        request.files.get("image"), request.form.get("client_id"))
    except AccountClosed:
        return login_manager.unauthorized()  # a disabled or deleted account, as on every route
    except DomainError as exc:
        response = make_response(_fail(exc, lambda **kw: _chat_page(cid, **kw)))
        if isinstance(exc, ImageRefused):
            response.headers["HX-Trigger"] = "image-refused"  # the page takes the attachment off
        return response
    status = 201 if created else 200
    if is_htmx():
        return render_template("chat/_sent.html", message=message), status
    return redirect(url_for("chat.conversation", cid=cid, _anchor=f"message-{message.id}"), 303)


def _owner_action(cid: int, action):
    """Run a membership action on a conversation the user belongs to, then go back to it."""
    try:
        conversation, membership = get_conversation_for(current_user.id, cid)
        target = action(conversation, membership) or url_for("chat.conversation", cid=cid)
    except DomainError as exc:
        return _fail(exc, lambda **kw: _chat_page(cid, **kw))
    if is_htmx():
        return Response(status=204, headers={"HX-Redirect": target})
    return redirect(target, 303)


@bp.post("/conversations/<int:cid>/read")
@login_required
def read(cid: int):
    """Mark every message of the conversation read for this user."""
    def do(conversation, _membership):
        mark_read(current_user.id, conversation)

    return _owner_action(cid, do)


@bp.post("/conversations/<int:cid>/hide")
@login_required
def hide(cid: int):
    """Hide the conversation from this user's list."""
    def do(conversation, membership):
        convs.hide(_me(), conversation, membership)
        return url_for("chat.index")

    return _owner_action(cid, do)


@bp.post("/conversations/<int:cid>/leave")
@login_required
def leave(cid: int):
    """Leave a group."""
    def do(conversation, _membership):
        convs.leave(_me(), conversation)
        return url_for("chat.index")

    return _owner_action(cid, do)


@bp.post("/conversations/<int:cid>/members")
@login_required
def add_members(cid: int):
    """Add members to a group (owner)."""
    def do(conversation, _membership):
        convs.add_members(_me(), conversation, request.form.getlist("member_ids"), request.form.get("usernames", ""))

    return _owner_action(cid, do)


@bp.post("/conversations/<int:cid>/members/<int:uid>/remove")
@login_required
def remove_member(cid: int, uid: int):
    """Remove a member from a group (owner)."""
    def do(conversation, _membership):
        convs.remove_member(_me(), conversation, uid)

    return _owner_action(cid, do)


@bp.post("/conversations/<int:cid>/settings")
@login_required
def group_settings(cid: int):
    """Rename a group or change its picture (owner)."""
    def do(conversation, _membership):
        convs.update_group(_me(), conversation, request.form.get("name"), request.files.get("image"))

    return _owner_action(cid, do)


@bp.post("/conversations/<int:cid>/disband")
@login_required
def disband(cid: int):
    """Delete a group with all its messages (owner)."""
    def do(conversation, _membership):
        convs.disband(_me(), conversation)
        return url_for("chat.index")

    return _owner_action(cid, do)


@bp.get("/viewer/<int:uid>.css")
def viewer_css(uid: int):
    """Style the viewer's own messages (the same message fragment serves every member's page).

    A stylesheet rather than an inline <style>, which the Content-Security-Policy refuses. It is
    a function of the URL alone and reveals nothing: any cache may keep it for a day.
    """
    return Response(render_template("chat/viewer.css", uid=uid), mimetype="text/css",
                    headers={"Cache-Control": "public, max-age=86400"})


@bp.get("/images/<image_id>")
@bp.get("/images/<image_id>/<variant>")
@login_required
def image(image_id: str, variant: str = "full"):
    """Serve an image to those allowed to see it: members for conversation images, users for avatars."""
    try:
        served = image_for(current_user.id, image_id, variant)
    except DomainError:
        abort(404)
    # The bytes of an id never change, but who may see them does (a member leaves, a group is
    # disbanded): browsers keep the image yet ask every time, and get 304 only while allowed.
    headers = {"Cache-Control": "private, no-cache", "ETag": f'"{served.id}-{variant}"'}
    if request.if_none_match.contains_weak(f"{served.id}-{variant}"):
        return Response(status=304, headers=headers)
    return Response(served.body, mimetype=served.content_type, headers={**headers, "Content-Disposition": "inline"})
