"""Rendering: what each kind of event sends to this process's sockets, one function per type.

Each renderer takes the hub (whose sockets are here) and a typed event, and returns the sends
and closes it causes, in order. Frames are rendered from the same Jinja macros as the pages
(chat/_macros.html), in each socket's language. RENDERERS maps each event type to its renderer.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from flask import current_app, render_template
from flask_babel import force_locale
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from ..events import (ConversationChanged, ConversationRead, ConversationRemoved, Event, ListsStale, MessageSent,
                      SessionClosed, Typing, UserClosed)
from ..extensions import db
from ..models import Membership, Message
from ..services.conversation_list import make_row, rows_for_members
from ..services.read_state import mark_read_for
from .transport import Client, Frame

Actions = list[Callable[[], None]]


def render(client: Client, template: str, **context) -> str:
    """Render a frame in the socket's own language."""
    with force_locale(client.locale):
        return render_template(template, **context)


def _macros():
    """The fragment macros of chat/_macros.html, called directly for live frames.

    A frame is rendered for every new message on every process: calling the macros skips
    building a template context (and Flask's page context) for each one.
    """
    return current_app.jinja_env.get_template("chat/_macros.html").module


def message_sent(hub, event: MessageSent) -> Actions:
    """Push a new message from what its event carries; no query unless someone here is viewing it.

    A frame is the message and, unless hidden, the member's list row with their own badge. The
    message is rendered once per language, the row up to the badge once per language (a 1:1's
    once per side), the row's closing tags once, each badge once per count: a group's row is not
    rendered again for every member. Each frame is those pieces joined around the member's badge.
    """
    local = set(hub.local_members(event))
    if not local:
        return []
    message, conversation = event.message, event.conversation
    states = {s.user_id: s for s in event.members if s.user_id in local}
    unread = {uid: s.unread for uid, s in states.items()}
    # A socket viewing this conversation reads arriving messages at once (one UPDATE for all).
    viewing = hub.viewers(event)
    if viewing:
        for uid in mark_read_for(message.conversation_id, viewing, message.id):
            unread[uid] = 0
    people = {p.id: p for p in event.people}
    targets: list[tuple[Client, tuple, int]] = []
    keys: dict[str, dict[tuple, object]] = {}  # locale -> row key -> the row's peer
    for uid, count in unread.items():
        hidden = states[uid].hidden_through
        visible = hidden is None or hidden < message.id
        peer = None if conversation.is_group else next((p for pid, p in people.items() if pid != uid), None)
        for client in hub.clients_of(uid):
            key = (visible, peer.id if peer else None, client.locale)
            keys.setdefault(client.locale, {})[key] = peer
            targets.append((client, key, count))
    heads = _frame_heads(message, conversation, keys)
    return _badged_frames(targets, heads, message.conversation_id, message.id)


def _frame_heads(message, conversation, keys: dict[str, dict[tuple, object]]) -> dict[tuple, Markup]:
    """Render each frame's start (the message, and the row up to its badge) once per language and peer."""
    macros = _macros()
    heads: dict[tuple, Markup] = {}
    for locale, peers in keys.items():
        with force_locale(locale):
            item = macros.message_oob(message)
            for key, peer in peers.items():
                # The row's start holds no count (the badge does): one start serves every count.
                row = macros.row_oob_start(make_row(conversation, peer, 0)) if key[0] else None
                heads[key] = macros.frame_head(item, row)
    return heads


def _badged_frames(targets, heads, cid: int, mid: int) -> Actions:
    """Join each socket's frame: its head, its own badge and the row's end (each count rendered once)."""
    macros = _macros()
    close = macros.row_oob_end()
    frames: dict[tuple, str] = {}
    out: Actions = []
    for client, key, count in targets:
        frame = frames.get((key, count))
        if frame is None:
            visible = key[0]
            frame = frames[key, count] = Frame(heads[key] + macros.badge(cid, count) + close if visible
                                               else heads[key])
        out.append(partial(client.send, frame, mid=mid))
    return out


def conversation_changed(hub, event: ConversationChanged) -> Actions:
    """Fresh list rows of one conversation for local members (or for the given users).

    When the change added a system line (created, added, removed, left, renamed), each member
    gets it with their row, as a new message: an open conversation shows it at once.
    """
    return _rows(hub, event.conversation_id, event.user_ids, event.removed_user_ids, event.line_id)


def conversation_read(hub, event: ConversationRead) -> Actions:
    """The reader's row with its badge cleared, on their other tabs."""
    return _rows(hub, event.conversation_id, [event.user_id], [])


def _rows(hub, cid: int, uids, removed_uids, line_id: int | None = None) -> Actions:
    local = hub.local_user_ids()
    removed = set(removed_uids)
    out: Actions = []
    for uid in removed & local:
        for client in hub.clients_of(uid):
            out.append(partial(client.send, render(client, "realtime/_removed.html", cid=cid)))
    wanted = (local if uids is None else set(uids) & local) - removed
    if not wanted:
        return out
    rows = rows_for_members(cid, wanted)
    line = None
    if line_id is not None and rows:
        line = db.session.scalar(select(Message).options(joinedload(Message.sender)).where(
            Message.id == line_id, Message.conversation_id == cid))
    for uid in wanted:
        if uid not in rows and uids is None:
            continue  # not a member: nothing to show or take away
        row = rows.get(uid)
        is_member = uid in rows  # with no row: hidden, so it leaves the list but stays open
        for client in hub.clients_of(uid):
            if row is None:  # hidden, or no longer a member
                html = render(client, "realtime/_removed.html", cid=cid, hidden=is_member)
                out.append(partial(client.send, html))
            elif line is not None:
                html = render(client, "realtime/_message_frame.html", message=line, row=row, me_id=uid)
                out.append(partial(client.send, html, mid=line.id))
            else:
                out.append(partial(client.send, render(client, "realtime/_row_frame.html", row=row)))
    return out


def conversation_removed(hub, event: ConversationRemoved) -> Actions:
    """The conversation leaves its former members' lists, and their open pages say it is gone."""
    return [partial(client.send, render(client, "realtime/_removed.html", cid=event.conversation_id))
            for uid in event.user_ids for client in hub.clients_of(uid)]


def typing(hub, event: Typing) -> Actions:
    """A typing hint for the other current members viewing the conversation."""
    cid = event.conversation_id
    viewers = [c for c in hub.all_clients() if c.joined == cid and c.user_id != event.user_id]
    if not viewers:
        return []
    # Only current members: someone removed a moment ago may still have it open.
    members = set(db.session.scalars(select(Membership.user_id).where(
        Membership.conversation_id == cid, Membership.user_id.in_({c.user_id for c in viewers}))).all())
    return [partial(client.send, render(client, "realtime/_typing.html", cid=cid, name=event.name,
                                        uid=event.user_id))
            for client in viewers if client.user_id in members]


def user_closed(hub, event: UserClosed) -> Actions:
    """Close every socket of a disabled or deleted user."""
    return [partial(client.close, event.code, "signed out") for client in hub.clients_of(event.user_id)]


def session_closed(hub, event: SessionClosed) -> Actions:
    """Close the sockets of one signed-out browser session."""
    return [partial(client.close, 1008, "signed out") for client in hub.all_clients()
            if client.sid and client.sid == event.session_id]


def lists_stale(hub, event: ListsStale) -> Actions:
    """Tell these users' pages to reload their lists."""
    return [partial(client.send, render(client, "realtime/_refresh.html"))
            for uid in event.user_ids for client in hub.clients_of(uid)]


RENDERERS: dict[type[Event], Callable[..., Actions]] = {
    MessageSent: message_sent,
    ConversationChanged: conversation_changed,
    ConversationRead: conversation_read,
    ConversationRemoved: conversation_removed,
    Typing: typing,
    UserClosed: user_closed,
    SessionClosed: session_closed,
    ListsStale: lists_stale,
}


def plan(hub, event: Event) -> Actions:
    """Return the sends and closes one event causes on this process's sockets, in order."""
    return RENDERERS[type(event)](hub, event)
