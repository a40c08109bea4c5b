"""What a client sends: the bounded queue of its received frames, and reading one frame.

simple-websocket's reader greenlet parses every frame that arrives and appends it to the socket's
``input_buffer``, a list without a bound, whatever the handler's pace: a client flooding 259,465
typing frames in 4.3 s left a backlog that kept both workers busy for minutes after it closed
(bench/results/flood-before-r10.txt). `Inbox` replaces that list with a bounded one.
"""
from __future__ import annotations

import json
import re
from collections import deque

from flask_babel import lazy_gettext as _l


class Inbox:
    """A socket's received frames waiting for its handler: at most `frames` of them and `chars` characters.

    Used as simple-websocket's ``input_buffer``, whose reader calls ``append`` and whose
    ``receive()`` calls ``pop(0)``. A frame arriving when the inbox is full is dropped and the
    inbox says so (`overflowed`): the handler closes the socket as a flood. A frame alone in the
    inbox is always taken (its size is bounded by the socket's ``max_message_size``).
    """

    def __init__(self, frames: int = 64, chars: int = 256 * 1024) -> None:
        self.max_frames = frames
        self.max_chars = chars
        self.overflowed = False
        self._frames: deque = deque()
        self._chars = 0

    def append(self, frame) -> None:
        size = len(frame)
        if self._frames and (len(self._frames) >= self.max_frames or self._chars + size > self.max_chars):
            self.overflowed = True
            return
        self._frames.append(frame)
        self._chars += size

    def extend(self, frames) -> None:
        for frame in frames:
            self.append(frame)

    def pop(self, _index: int = 0):
        """Take the oldest frame (IndexError when there is none, as a list's pop)."""
        frame = self._frames.popleft()
        self._chars -= len(frame)
        return frame

    def __len__(self) -> int:
        return len(self._frames)


class FrameRefused(Exception):
    """A client frame that cannot be read: its user-facing message and the error frame's code."""

    def __init__(self, message, code: str = "bad_request") -> None:
        super().__init__(str(message))
        self.message = message
        self.code = code


# Escapes (skipped), quotes (strings' edges) and brackets: one linear pass, no backtracking.
_STRUCTURE = re.compile(r'\\.|["\[\]{}]', re.DOTALL)


def nested_deeper_than(text: str, limit: int) -> bool:
    """Say whether JSON text nests arrays and objects more than `limit` deep (brackets in strings do not count)."""
    if text.count("[") + text.count("{") <= limit:
        return False  # it cannot nest deeper than it has openers: the usual frame costs two counts
    depth, in_string = 0, False
    for token in _STRUCTURE.findall(text):
        if token == '"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def read_frame(raw, max_bytes: int, max_depth: int) -> dict:
    """Return a client frame's JSON object, or raise FrameRefused saying why not."""
    if isinstance(raw, bytes):
        raise FrameRefused(_l("Frames must be JSON text."))
    if len(raw) > max_bytes or len(raw.encode()) > max_bytes:
        raise FrameRefused(_l("That frame is too large."), "too_large")
    # The parser recurses once per level: "[" * 30000 raised RecursionError, which became an
    # HTML 500 page written into the socket. Our frames are flat objects; refuse deep ones unread.
    if nested_deeper_than(raw, max_depth):
        raise FrameRefused(_l("That frame is nested too deeply."), "too_deep")
    try:
        frame = json.loads(raw)
    except RecursionError:
        raise FrameRefused(_l("That frame is nested too deeply."), "too_deep") from None
    except ValueError:
        raise FrameRefused(_l("Frames must be JSON text.")) from None
    if not isinstance(frame, dict):
        raise FrameRefused(_l("Frames must be JSON objects."))
    return frame
