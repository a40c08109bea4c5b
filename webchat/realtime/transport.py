"""Transport: one open socket (per-socket state and a send lock) and the frames written to it."""
from __future__ import annotations

import logging
import socket
import threading
from collections import OrderedDict

from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import TextMessage

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

    def send(self, data, flags: int = 0) -> int:
        view = memoryview(data)
        with self._lock:
            while view:
                view = view[self._sock.send(view, flags):]
        return len(data)

    sendall = send

    def __getattr__(self, name):
        return getattr(self._sock, name)


class Client:
    """One open socket: a send lock (flask-sock's send is not thread-safe) and what it has seen."""

    def __init__(self, ws, user_id: int, sid: str | None, locale: str, send_timeout: float = 5.0) -> None:
        self.ws = ws
        # A simple-websocket connection: its writes go whole through one lock, and encoded
        # frames go straight to the socket.
        self.wire: WholeWrites | None = None
        if hasattr(ws, "sock"):
            ws.sock = self.wire = WholeWrites(ws.sock)
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

    def close(self, code: int, reason: str = "") -> None:
        """Close the socket with this code (1008 signed out, 1011 try again, 1012 restart)."""
        with self.lock:
            try:
                self.ws.close(reason=code, message=reason)
            except Exception:
                pass
