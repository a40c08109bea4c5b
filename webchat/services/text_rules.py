"""Rules for user text shown to others: invisible and direction-changing characters, names that look alike.

Bidi controls can make one text read as another ("txt.exe" shown as "exe.txt"), and zero-width
characters make a nickname look like someone else's or a message look empty. Message bodies keep
them (Persian needs the zero-width non-joiner, emoji sequences the joiner; pages isolate each
user text with <bdi> so nothing leaks into what surrounds it) but must hold something visible;
names lose them.
"""
from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

from flask_babel import lazy_gettext as _l

from . import DomainError

# Bidi embeddings, overrides and isolates, the directional marks, and the Arabic letter mark.
BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
# Zero-width space, non-joiner, joiner, word joiner and the byte-order mark (zero-width no-break space).
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
_STRIPPED = re.compile(f"[{BIDI_CONTROLS}{ZERO_WIDTH}]")
# Letters that render as blank space without being whitespace (Hangul fillers, the blank Braille cell).
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Whitespace and other control characters (newlines and tabs included) in a name: one space.
_NAME_SPACES = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")
MAX_NAME = 64


class VisibleText(NamedTuple):
    """A text without bidi controls and zero-width characters, and whether anything visible is left."""

    text: str
    visible: bool


def _shows(char: str) -> bool:
    # Format (Cf), control (Cc), separator (Z*) and combining (M*, nothing to combine with on
    # its own) characters draw nothing by themselves.
    category = unicodedata.category(char)
    return category[0] not in "CZM" and char not in _BLANK_LETTERS and not char.isspace()


def visible_text(value: str | None) -> VisibleText:
    """Strip bidi controls and zero-width characters; say whether anything visible is left."""
    text = _STRIPPED.sub("", value or "")
    return VisibleText(text, any(_shows(c) for c in text))


def check_display_name(name: str | None, message=None) -> str:
    """Return a nickname (or group name) without invisible characters, or refuse it (422).

    Whitespace runs become one space; 1 to 64 characters must be left, something of them visible.
    """
    text, visible = visible_text(name if isinstance(name, str) else "")
    text = _NAME_SPACES.sub(" ", text).strip()
    if not visible or not 1 <= len(text) <= MAX_NAME:
        raise DomainError(message or _l("Nicknames are 1 to 64 characters."), 422)  # MAX_NAME
    return text


def name_key(name: str | None) -> str:
    r"""Return what two names are compared by: no invisible characters, compatibility forms, any case.

    "Alice", "alice", "ａｌｉｃｅ" and "al\u200bice" have the same key. (Look-alike letters of other
    scripts, Cyrillic "а" for Latin "a", do not: the @username shown beside a name tells them apart.)
    """
    text = unicodedata.normalize("NFKC", visible_text(name).text).casefold()
    return " ".join(_NAME_SPACES.sub(" ", text).split())
