"""Transport: one open socket (per-socket state and a send lock) and the frames written to it."""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from contextlib import suppress

from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import TextMessage

from .inbound import Inbox

log = logging.getLogger(__name__)
SENT_MEMORY = 5000


def _send_deadline(seconds: float):
    """A reusable timer that bounds a socket write under gevent, where a full TCP window would
    block forever; None without gevent's patched sockets (writes block the thread there)."""
    try:
        from gevent import Timeout
        from gevent.monkey import is_module_patched
    except ImportError:  # pragma: no cover - gevent is a dependency
        return None
    return Timeout(seconds) if is_module_patched("socket") else None


_ENCODER = WSConnection(ConnectionType.SERVER)


class Frame(str):
    """A text frame's HTML and, once asked for, its bytes on the wire.

    A server's frames are not masked, so the same bytes suit every socket: a message's frame for
    fifty members' sockets is encoded once, not fifty times. (Sockets never negotiate an
    extension: the handshake declines permessage-deflate.)
    """

    __slots__ = ("_wire",)

    @property
    def wire(self) -> bytes:
        try:
            return self._wire
        except AttributeError:
            # A final frame leaves the encoder's state as it was: one encoder serves every thread.
            self._wire = _ENCODER.send(TextMessage(data=str(self)))
            return self._wire


class WholeWrites:
    """A socket whose ``send`` writes all of its bytes, one caller at a time.

    simple-websocket 1.1.0 writes each frame with one ``socket.send`` and ignores a short write
    (simple-websocket issue #45): under gevent, when the peer's TCP window is nearly full, the
    rest of the frame is dropped and the next frame starts inside it, which corrupts the stream.
    Its reader thread also writes (pongs, the closing frame), so the writes share a lock.
    """

    def __init__(self, sock) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._drain_until: float | None = None

    def send(self, data, flags: int = 0) -> int:
        view = memoryview(data)
        with self._lock:
            while view:
                view = view[self._sock.send(view, flags):]
        return len(data)

    sendall = send

    def drain_on_close(self, seconds: float) -> None:
        """From now on the reader gets the end of the connection: what the peer still sends is dropped
        unread, for `seconds` at most or until the peer closes, before the socket closes.

        Closing a socket with unread bytes resets the connection, and the peer's system then throws
        away what it had not read yet: a client that kept sending would lose our last frames (the
        error frame and the closing frame) and see 1006, which browsers take as "reconnect".
        """
        self._drain_until = time.monotonic() + seconds

    def recv(self, size: int, *flags) -> bytes:
        if self._drain_until is None:
            return self._sock.recv(size, *flags)
        self._drain()
        return b""  # simple-websocket's reader takes this as the end of the connection

    def close(self) -> None:
        if self._drain_until is not None:
            self._drain()
        self._sock.close()

    def _drain(self) -> None:
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)  # our closing frame was the last: the peer may close too
            while (left := self._drain_until - time.monotonic()) > 0:
                self._sock.settimeout(left)
                if not self._sock.recv(65536):
                    break
        self._drain_until = time.monotonic()  # once

    def __getattr__(self, name):
        return getattr(self._sock, name)


class Client:
    """One open socket: a send lock (flask-sock's send is not thread-safe) and what it has seen."""

    def __init__(self, ws, user_id: int, sid: str | None, locale: str, send_timeout: float = 5.0,
                 inbox: Inbox | None = None) -> None:
        self.ws = ws
        # A simple-websocket connection: its writes go whole through one lock, and encoded
        # frames go straight to the socket.
        self.wire: WholeWrites | None = None
        if hasattr(ws, "sock"):
            ws.sock = self.wire = WholeWrites(ws.sock)
        # Its reader fills `input_buffer`, a list without a bound: a bounded inbox takes its place
        # (with what arrived already; under gevent the reader cannot run between these lines).
        self.inbox = inbox if inbox is not None else Inbox()
        if hasattr(ws, "input_buffer"):
            self.inbox.extend(ws.input_buffer)
            ws.input_buffer = self.inbox
        self._deadline = _send_deadline(send_timeout)
        self.user_id = user_id
        self.sid = sid
        self.locale = locale
        self.joined: int | None = None
        self.last_id = 0
        self.lock = threading.Lock()
        self._sent: OrderedDict[int, None] = OrderedDict()
        self._ready = False
        self._pending: list[tuple[int | None, str]] = []
        self._replayed: list[tuple[int | None, str]] = []

    def send(self, html: str, mid: int | None = None, replayed: bool = False) -> None:
        """Send a frame once; frames for a message already sent to this socket are dropped."""
        with self.lock:
            if mid is not None:
                if mid in self._sent:
                    if replayed and not self._ready:
                        self._move_to_replay(mid)
                    return
                self._sent[mid] = None
                if len(self._sent) > SENT_MEMORY:
                    self._sent.popitem(last=False)
                self.last_id = max(self.last_id, mid)
            if not self._ready:
                # Live frames wait until replay has sent the older ones, to keep order.
                (self._replayed if replayed else self._pending).append((mid, html))
                return
            self._write(html)

    def _move_to_replay(self, mid: int) -> None:
        """Send a live frame held during replay in the replay's place when the replay reaches its message.

        Otherwise a sender's message published after the socket registered, but before replay read
        the sender's next message, would come after that next one.
        """
        for index, (pending_mid, _html) in enumerate(self._pending):
            if pending_mid == mid:
                self._replayed.append(self._pending.pop(index))
                return

    def _write(self, html: str) -> None:
        if self._deadline is not None:
            self._deadline.start()
        try:
            if isinstance(html, Frame) and self.wire is not None:
                if self.ws.connected:
                    self.wire.send(html.wire)
            else:
                self.ws.send(html)
        except BaseException as exc:  # gevent's Timeout is a BaseException
            if exc is not self._deadline:
                if isinstance(exc, Exception):
                    return  # a closing socket: its handler cleans up
                raise
            # A peer whose TCP window stays full would hold up every other delivery of this
            # process (the listener writes inline): cut it off; it reconnects and replays.
            log.warning("socket of user %s stopped reading: dropping it", self.user_id)
            self.abort()
        finally:
            if self._deadline is not None:
                self._deadline.cancel()

    def abort(self) -> None:
        """Drop the connection without a closing handshake (its send may be half-written)."""
        self.ws.connected = False
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def start_live(self) -> None:
        """Flush the frames that arrived during replay and send live from now on."""
        with self.lock:
            for _mid, html in self._replayed + self._pending:
                self._write(html)
            self._replayed.clear()
            self._pending.clear()
            self._ready = True

    def close(self, code: int, reason: str = "", linger: float = 0.0) -> None:
        """Close the socket with this code (1008 signed out, 1011 try again, 1012 restart).

        With `linger`, for a peer that may still be sending: wait (that long at most) until it has
        had our closing frame, dropping what it sends meanwhile (WholeWrites.drain_on_close).
        """
        with self.lock:
            if linger and self.wire is not None:
                self.wire.drain_on_close(linger)
            try:
                self.ws.close(reason=code, message=reason)
            except Exception:
                pass
        reader = getattr(self.ws, "thread", None)
        if linger and reader is not None:
            reader.join(linger + 0.5)  # the reader drains, then closes the socket
