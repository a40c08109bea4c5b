"""Jinja filters: safe links in message text, message times, and sizes in the page's language."""
from __future__ import annotations

import re
from datetime import datetime, timezone

from flask import Flask
from flask_babel import format_decimal, ngettext
from markupsafe import Markup, escape

URL_RE = re.compile(r"\bhttps?://[^\s<>\"'`]+", re.IGNORECASE)
TRAILING = ".,;:!?)]}'\""


def linkify(text: str | None) -> Markup:
    """Escape text and turn http(s) URLs into links that open safely in a new tab."""
    text = text or ""
    out = []
    pos = 0
    for match in URL_RE.finditer(text):
        url = match.group(0)
        trimmed = url.rstrip(TRAILING)
        end = match.start() + len(trimmed)
        out.append(escape(text[pos:match.start()]))
        out.append(Markup('<a href="{0}" target="_blank" rel="noopener noreferrer nofollow ugc">{0}</a>').format(trimmed))
        pos = end
    out.append(escape(text[pos:]))
    return Markup("").join(out)


def short_time(value: datetime | None, now: datetime | None = None) -> str:
    """Format a time for lists: hh:mm today, the weekday this week, else the date (UTC; JS localises)."""
    if value is None:
        return ""
    now = now or datetime.now(timezone.utc)
    if value.date() == now.date():
        return value.strftime("%H:%M")
    if 0 < (now.date() - value.date()).days < 7:
        return value.strftime("%a")
    return value.strftime("%Y-%m-%d")


def iso(value: datetime | None) -> str:
    return value.isoformat() if value else ""


def file_size(size: int | None) -> str:
    """A byte count for people, in the page's language (Jinja's filesizeformat says "Bytes" in every one)."""
    size = int(size or 0)
    if size < 1000:
        return ngettext("%(num)d byte", "%(num)d bytes", size)
    value = float(size)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if round(value, 1) < 1000 or unit == "TB":  # 999,950 bytes is "1 MB", not "1,000 kB"
            break
    return f"{format_decimal(value, format='#,##0.#')} {unit}"


def register_filters(app: Flask) -> None:
    app.jinja_env.filters["linkify"] = linkify
    app.jinja_env.filters["short_time"] = short_time
    app.jinja_env.filters["iso"] = iso
    app.jinja_env.filters["file_size"] = file_size
