"""The words of a message outside its bubble: system lines and list-row previews."""
from __future__ import annotations

from flask_babel import force_locale
from flask_babel import gettext as _

from ..models import Message


def system_text(message: Message) -> str:
    """Return the human text of a system line in the current locale."""
    actor = message.sender.name if message.sender else _("Someone")
    texts = {
        "created": _("%(actor)s created the group “%(name)s”", actor=actor, name=message.body),
        "added": _("%(actor)s added %(names)s", actor=actor, names=message.body),
        "removed": _("%(actor)s removed %(name)s", actor=actor, name=message.body),
        "left": _("%(name)s left the group", name=message.body or actor),
        "renamed": _("%(actor)s renamed the group to “%(name)s”", actor=actor, name=message.body),
    }
    return texts.get(message.event or "", message.body)


def preview_of(message: Message) -> str:
    """Return the list-row preview of a message (stored, so in the server's default locale)."""
    if message.kind == "system":
        with force_locale("en"):
            return system_text(message)[:200]
    return " ".join(message.body.split())[:200]
