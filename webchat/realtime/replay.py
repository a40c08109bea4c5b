"""Replay: a (re)connecting socket gets, in order, every message it missed, from the database."""
from __future__ import annotations

from flask import render_template
from flask_babel import force_locale

from ..models import Message
from ..services.conversation_list import rows_for_user
from ..services.history import messages_for_replay
from .transport import Client


def replay(client: Client, after: int, page: int = 500, max_pages: int = 10) -> int:
    """Send, in order, the messages newer than `after` in the client's conversations; return how many.

    A gap larger than `page * max_pages` messages is not streamed: the page is told to reload.
    """
    messages: list[Message] = []
    cursor, lookback = after, True
    for _ in range(max_pages):
        batch = messages_for_replay(client.user_id, cursor, limit=page, lookback=lookback)
        messages.extend(batch)
        if len(batch) < page:
            break
        cursor, lookback = batch[-1].id, False
    else:
        with force_locale(client.locale):
            client.send(render_template("realtime/_reload.html"), replayed=True)
        return 0
    last_by_conv: dict[int, int] = {}
    for m in messages:
        last_by_conv[m.conversation_id] = m.id
    rows = rows_for_user(client.user_id, last_by_conv)
    with force_locale(client.locale):
        for m in messages:
            row = rows.get(m.conversation_id) if last_by_conv[m.conversation_id] == m.id else None
            html = render_template("realtime/_message_frame.html", message=m, row=row, me_id=client.user_id)
            client.send(html, mid=m.id, replayed=True)
    return len(messages)
