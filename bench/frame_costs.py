"""python -m bench.frame_costs: what one pushed frame costs per socket, piece by piece (in-process).

The pieces of a socket write in webchat's push path, timed with timeit under gevent's patched
sockets as in the gunicorn workers (a Unix socketpair stands in for the TCP connection, with a
greenlet reading the other end):

- the write deadline: a new gevent Timeout per write against one reused Timeout per socket;
- encoding a 1 KB text frame with wsproto (once per socket against once per distinct frame);
- writing it: gevent's sendall (which asks the socket for SO_SNDBUF every call) against send()
  in a loop (one call when the window has room);
- permessage-deflate: encoding with wsproto's extension, and the memory its zlib state holds
  once a frame has gone out (why the handshake declines it).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import timeit  # noqa: E402

import gevent  # noqa: E402
from gevent import Timeout  # noqa: E402
from wsproto.connection import Connection, ConnectionType  # noqa: E402
from wsproto.events import TextMessage  # noqa: E402
from wsproto.extensions import PerMessageDeflate  # noqa: E402
from wsproto.frame_protocol import FrameProtocol  # noqa: E402


def per_call_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def rss_kb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.frame_costs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=20000, help="calls per timing (best of 3)")
    parser.add_argument("--sockets", type=int, default=2000, help="deflate states for the memory figure")
    args = parser.parse_args()
    n = args.number
    text = ('<div hx-swap-oob="beforeend:#messages-2"><article class="msg" id="message-1">'
            + "chat message text " * 56)[:1100]

    reused = Timeout(5)

    def reuse():
        reused.start()
        reused.cancel()

    print(f"write deadline, a new Timeout per write:     {per_call_us(lambda: Timeout(5).__enter__().__exit__(None, None, None), n):6.1f} µs")
    print(f"write deadline, one Timeout reused:           {per_call_us(reuse, n):6.1f} µs")

    encoder = Connection(ConnectionType.SERVER)
    print(f"encode a {len(text)}-char frame (wsproto):         {per_call_us(lambda: encoder.send(TextMessage(data=text)), n):6.1f} µs")

    writer, reader = socket.socketpair()

    def drain():
        while reader.recv(1 << 20):
            pass

    gevent.spawn(drain)
    wire = encoder.send(TextMessage(data=text))
    lock = threading.Lock()

    def send_loop():
        view = memoryview(wire)
        with lock:
            while view:
                view = view[writer.send(view):]

    print(f"write it, gevent sendall:                     {per_call_us(lambda: writer.sendall(wire), n):6.1f} µs")
    print(f"write it, send() in a loop under a lock:      {per_call_us(send_loop, n):6.1f} µs")

    deflating = PerMessageDeflate()
    deflating._enabled = True  # as after a handshake that accepted it
    compressed = FrameProtocol(client=False, extensions=[deflating])
    plain = FrameProtocol(client=False, extensions=[])
    print(f"encode with permessage-deflate:               {per_call_us(lambda: compressed.send_data(text, True), n):6.1f} µs")
    print(f"encode without:                               {per_call_us(lambda: plain.send_data(text, True), n):6.1f} µs")

    before, states = rss_kb(), []
    for _ in range(args.sockets):
        extension = PerMessageDeflate()
        extension._enabled = True
        protocol = FrameProtocol(client=False, extensions=[extension])
        protocol.send_data(text, True)
        states.append(protocol)
    print(f"deflate state per socket after one frame:     {(rss_kb() - before) / args.sockets:6.1f} KB "
          f"({args.sockets} sockets)")


if __name__ == "__main__":
    main()
