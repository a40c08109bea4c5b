"""Reading and limiting client frames, in-process: nesting, the bounded inbox, token buckets, verdicts."""
import pytest

from webchat.realtime import limits as limits_module
from webchat.realtime.inbound import FrameRefused, Inbox, nested_deeper_than, read_frame
from webchat.realtime.limits import PerUser, Settings, TokenBucket, Verdict
from webchat.realtime.transport import Client


@pytest.mark.parametrize("text, deeper", [
    ('{"type": "message", "body": "hi", "HEADERS": {"HX-Request": "true"}}', False),
    ('{"a": {"b": {"c": {"d": 1}}}}', False),
    ('{"a": {"b": {"c": {"d": {"e": 1}}}}}', True),
    ("[" * 30000, True),
    ('{"body": "[[[[[[[[{{{{{{{{"}', False),  # brackets inside a string do not nest
    ('{"body": "a \\" [[[[[[[[[["}', False),  # nor after an escaped quote
    ('{"body": "\\\\", "x": [[[[[1]]]]]}', True),  # an escaped backslash ends before the quote
])
def test_nesting_is_measured_outside_strings(text, deeper):
    assert nested_deeper_than(text, 4) is deeper


def test_a_deeply_nested_frame_is_refused_before_parsing():
    with pytest.raises(FrameRefused) as info:
        read_frame("[" * 30000, 64 * 1024, 4)
    assert info.value.code == "too_deep"


def test_a_frame_the_parser_cannot_descend_is_refused_too():
    """With the nesting check set out of the way, the parser's RecursionError still becomes a refusal."""
    with pytest.raises(FrameRefused) as info:
        read_frame("[" * 100000, 1024 * 1024, 10**9)
    assert info.value.code == "too_deep"


@pytest.mark.parametrize("raw, code", [
    (b"{}", "bad_request"), ("{not json", "bad_request"), ("[1, 2]", "bad_request"),
    ("x" * (64 * 1024 + 1), "too_large"), ('"' + "é" * 40000 + '"', "too_large"),
])
def test_unreadable_frames_are_refused_with_a_code(raw, code):
    with pytest.raises(FrameRefused) as info:
        read_frame(raw, 64 * 1024, 4)
    assert info.value.code == code


def test_the_inbox_holds_a_bounded_number_of_frames_and_characters():
    inbox = Inbox(frames=3, chars=100)
    inbox.extend(["a", "b", "c"])
    assert len(inbox) == 3 and not inbox.overflowed
    inbox.append("d")
    assert len(inbox) == 3 and inbox.overflowed
    assert [inbox.pop(0) for _ in range(3)] == ["a", "b", "c"]
    with pytest.raises(IndexError):  # simple-websocket's receive() relies on a list's IndexError
        inbox.pop(0)
    big = Inbox(frames=3, chars=10)
    big.append("x" * 50)  # alone, a frame is always taken (max_message_size bounds it)
    assert len(big) == 1 and not big.overflowed
    big.append("y")
    assert len(big) == 1 and big.overflowed


def test_a_client_replaces_the_sockets_unbounded_buffer_with_its_inbox():
    class Socket:
        connected = True

        def __init__(self):
            self.input_buffer = ["arrived already"]

    ws = Socket()
    client = Client(ws, 1, None, "en", inbox=Inbox(frames=2))
    assert ws.input_buffer is client.inbox and ws.input_buffer.pop(0) == "arrived already"


@pytest.fixture
def clock(monkeypatch):
    """Freeze the limits' clock; advance it with clock.now += seconds."""
    class Clock:
        now = 1000.0

    monkeypatch.setattr(limits_module, "clock", lambda: Clock.now)
    return Clock


def test_a_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)  # one token a half second
    assert bucket.full(100) and bucket.tokens == 3


def test_a_socket_that_outruns_its_frame_bucket_is_flooding(clock):
    socket = PerUser(Settings(frame_rate=20, frame_burst=40)).for_socket(1)
    assert sum(socket.admit_frame() for _ in range(100)) == 40
    clock.now += 0.5
    assert sum(socket.admit_frame() for _ in range(100)) == 10


def test_typing_hints_go_out_once_per_interval_per_user_and_conversation(clock):
    per_user = PerUser(Settings(typing_interval=2.0))
    tab, other_tab = per_user.for_socket(1), per_user.for_socket(1)
    assert tab.verdict("typing", 7) is Verdict.ACT
    assert tab.verdict("typing", 7) is Verdict.DROP
    assert other_tab.verdict("typing", 7) is Verdict.DROP  # the same user in another tab
    assert tab.verdict("typing", 8) is Verdict.ACT  # another conversation
    assert per_user.for_socket(2).verdict("typing", 7) is Verdict.ACT  # another user
    clock.now += 2.0
    assert tab.verdict("typing", 7) is Verdict.ACT


def test_messages_are_limited_per_socket_and_per_user(clock):
    per_user = PerUser(Settings(message_rate=1, message_burst=3, user_message_rate=1, user_message_burst=5))
    first, second = per_user.for_socket(1), per_user.for_socket(1)
    assert [first.verdict("message", 7) for _ in range(4)] == [Verdict.ACT] * 3 + [Verdict.REFUSE]
    # The user has 2 of 5 left; the second tab's own bucket is full, the user's decides.
    assert [second.verdict("message", 7) for _ in range(3)] == [Verdict.ACT] * 2 + [Verdict.REFUSE]
    assert per_user.for_socket(2).verdict("message", 7) is Verdict.ACT  # another user is not affected
    clock.now += 1.0
    assert first.verdict("message", 7) is Verdict.ACT


def test_idle_users_limits_are_forgotten_but_not_those_in_use(clock):
    per_user = PerUser(Settings(user_message_rate=1, user_message_burst=5))
    per_user.for_socket(1).verdict("message", 7)
    per_user.for_socket(2)
    per_user.for_socket(3).verdict("message", 7)
    per_user.forget_idle(keep={3})
    assert set(per_user._by_user) == {1, 3}  # 1's bucket is not full yet: forgetting it would refill it
    clock.now += 10
    per_user.forget_idle(keep={3})
    assert set(per_user._by_user) == {3}


def test_limits_come_from_the_config_with_defaults():
    settings = Settings.from_config({"WS_FRAME_RATE": 5, "WS_TYPING_INTERVAL": "2.5"})
    assert (settings.frame_rate, settings.typing_interval, settings.message_burst) == (5.0, 2.5, 20.0)


def test_a_live_frame_held_during_replay_goes_out_in_the_replays_order():
    """A sender's message 5 arrives live while replay runs; replay then reads 5 and the sender's next, 6."""
    class Socket:
        connected = True

        def __init__(self):
            self.frames = []

        def send(self, data):
            self.frames.append(data)

    client = Client(Socket(), 1, None, "en")
    client.send("five (live)", mid=5)  # held back: replay is running
    client.send("five (replayed)", mid=5, replayed=True)
    client.send("six (replayed)", mid=6, replayed=True)
    client.start_live()
    assert client.ws.frames == ["five (live)", "six (replayed)"]
