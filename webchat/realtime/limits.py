"""Rate limits on what clients send over their sockets: token buckets per socket and per user.

A browser sends a typing hint at most every 2.5 s (static/js/app.js), a join when a conversation
opens and a message when its user presses Enter. Each frame costs the server a query, and a typing
hint or a message a publish that every web process handles. So, per socket:

- every frame takes a token from the socket's frame bucket (WS_FRAME_RATE a second, up to
  WS_FRAME_BURST at once); a socket that finds it empty is flooding: it gets an error frame and
  is closed with 1008 (the handler does that);
- a message also takes a token from the socket's message bucket (WS_MESSAGE_RATE, WS_MESSAGE_BURST)
  and one from its user's (WS_USER_MESSAGE_RATE, WS_USER_MESSAGE_BURST, shared by all of the
  user's sockets on this process); without both it is refused with an error frame;
- a typing hint is relayed at most once per WS_TYPING_INTERVAL per user and conversation; the
  others are dropped silently, before any query.

The per-user buckets live in this process: a user's sockets on W web processes can send W times
the per-user rate. Buckets are only touched by socket handlers (greenlets, which do not
interleave within these few lines).
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, fields

clock = time.monotonic  # the buckets' clock (tests replace it)


@dataclass(frozen=True)
class Settings:
    """The limits, read once from the app's config (WS_<FIELD NAME>, e.g. WS_FRAME_RATE)."""

    frame_rate: float = 20.0
    frame_burst: float = 40.0
    message_rate: float = 10.0
    message_burst: float = 20.0
    user_message_rate: float = 20.0
    user_message_burst: float = 40.0
    typing_interval: float = 2.0

    @classmethod
    def from_config(cls, config) -> Settings:
        return cls(**{f.name: float(config.get("WS_" + f.name.upper(), f.default)) for f in fields(cls)})


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`; it starts full."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def has(self, now: float) -> bool:
        """Say whether a token is left, after refilling for the time since last asked."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1

    def take(self, now: float) -> bool:
        """Take a token if one is left; say whether one was."""
        if not self.has(now):
            return False
        self.tokens -= 1
        return True

    def full(self, now: float) -> bool:
        return self.has(now) and self.tokens >= self.burst


class UserLimits:
    """One user's limits on this process, shared by their sockets here."""

    def __init__(self, settings: Settings, now: float) -> None:
        self.settings = settings
        self.messages = TokenBucket(settings.user_message_rate, settings.user_message_burst, now)
        self.typed: dict[object, float] = {}  # conversation -> when a typing hint last went out

    def typing_due(self, conversation_id, now: float) -> bool:
        """Say whether a typing hint for this conversation may go out now (and note that it does)."""
        key = conversation_id if isinstance(conversation_id, (int, str)) else None
        if now - self.typed.get(key, -1e9) < self.settings.typing_interval:
            return False
        if len(self.typed) >= 64:  # someone typing in many conversations: keep the recent ones only
            self.typed = {k: t for k, t in self.typed.items() if now - t < self.settings.typing_interval}
        self.typed[key] = now
        return True

    def idle(self, now: float) -> bool:
        """Say whether forgetting these limits would change nothing (full bucket, no recent hint)."""
        return self.messages.full(now) and all(now - t >= self.settings.typing_interval
                                               for t in self.typed.values())


class PerUser:
    """Every user's limits on this process; idle ones are forgotten (forget_idle, from the heartbeat)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._by_user: dict[int, UserLimits] = {}
        self._lock = threading.Lock()

    def of(self, user_id: int) -> UserLimits:
        with self._lock:
            limits = self._by_user.get(user_id)
            if limits is None:
                limits = self._by_user[user_id] = UserLimits(self.settings, clock())
            return limits

    def for_socket(self, user_id: int) -> SocketLimits:
        """Fresh limits for a new socket of this user, sharing the user's."""
        return SocketLimits(self.settings, self.of(user_id))

    def forget_idle(self, keep=()) -> None:
        """Drop the limits of users not in `keep` (those with sockets here) that carry nothing."""
        now = clock()
        with self._lock:
            for user_id in [u for u, limits in self._by_user.items() if u not in keep and limits.idle(now)]:
                del self._by_user[user_id]


class Verdict(enum.Enum):
    ACT = "act"  # handle the frame
    DROP = "drop"  # ignore it silently (a typing hint too soon after the last)
    REFUSE = "refuse"  # answer it with a rate_limited error frame


class SocketLimits:
    """One socket's buckets, and its user's shared limits."""

    def __init__(self, settings: Settings, user: UserLimits) -> None:
        now = clock()
        self.user = user
        self.frames = TokenBucket(settings.frame_rate, settings.frame_burst, now)
        self.messages = TokenBucket(settings.message_rate, settings.message_burst, now)

    def admit_frame(self) -> bool:
        """Take a frame's token; False means the socket is flooding."""
        return self.frames.take(clock())

    def verdict(self, kind: str, conversation_id) -> Verdict:
        """Decide what to do with a readable frame of this kind, before anything is queried."""
        now = clock()
        if kind == "typing":
            return Verdict.ACT if self.user.typing_due(conversation_id, now) else Verdict.DROP
        if kind == "message":
            # Both buckets must have a token: a refusal by one does not spend the other's.
            if not (self.messages.has(now) and self.user.messages.has(now)):
                return Verdict.REFUSE
            self.messages.take(now)
            self.user.messages.take(now)
        return Verdict.ACT
