"""Image decoding under gevent runs in native threads, so the event loop keeps serving meanwhile.

Each test runs a small program in a fresh interpreter monkey-patched by gevent, as gunicorn's
gevent worker is (the test suite itself is not patched): a greenlet ticks every 10 ms while a
decode runs, and the longest gap between ticks says whether the loop was stopped.
"""
import json
import os
import subprocess
import sys
import textwrap

from PIL import Image

from webchat.services import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()

    import io, json, os, sys, threading, time
    import gevent
    from PIL import Image
    from webchat.services import images

    get_ident = monkey.get_original("threading", "get_ident")
    blocking_sleep = monkey.get_original("time", "sleep")
    ticks = []

    def ticker():
        while True:
            ticks.append(time.perf_counter())
            gevent.sleep(0.01)

    def longest_gap(work, *args):
        gevent.spawn(ticker)
        gevent.sleep(0.05)
        start = time.perf_counter()
        result = images.decode_gate(2).run(work, *args, wait=5)
        end = time.perf_counter()
        seen = [start] + [t for t in ticks if start <= t <= end] + [end]
        return result, max(b - a for a, b in zip(seen, seen[1:])), end - start

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def stall():
        blocking_sleep(0.5)  # holds its OS thread, as a decode does
        return get_ident(), niceness()

    if sys.argv[1] == "sleep":
        (ident, nice), gap, took = longest_gap(stall)
        print(json.dumps({"other_thread": ident != get_ident(), "lowered": nice - niceness(), "gap": gap,
                          "took": took}))
    else:
        buf = io.BytesIO()
        Image.new("RGBA", (3000, 3000), (10, 200, 30, 128)).save(buf, "PNG", compress_level=1)
        encoded, gap, took = longest_gap(images.decode_and_encode, buf.getvalue())
        print(json.dumps({"size": [encoded.width, encoded.height], "gap": gap, "took": took}))
""")


def run_under_gevent(case: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", PROGRAM, case], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_blocking_decode_runs_in_another_os_thread_while_the_loop_ticks():
    result = run_under_gevent("sleep")
    assert result["other_thread"]
    assert result["lowered"] == 10  # the loop's thread comes first when both want a core
    assert result["took"] >= 0.45
    assert result["gap"] < 0.25, result  # inline, the loop would stop for the whole 0.5 s


def test_pillow_decoding_leaves_the_loop_running():
    result = run_under_gevent("pillow")
    assert result["size"] == [2048, 2048]
    # A 9 MP RGBA decode, shrink and encode takes about half a second here; inline, the loop
    # would stop for all of it. In a thread it ticks on (gaps of 15-20 ms measured).
    assert result["gap"] < result["took"] / 3, result


def test_pictures_are_kept_in_blocks_above_glibcs_mmap_ceiling():
    # Below 32 MB a block may come from the heap, zeroed while the GIL is held, and stay after.
    if not os.environ.get("PILLOW_BLOCK_SIZE"):
        assert Image.core.get_block_size() == images.DECODE_BLOCK_BYTES > 32 * 1024 * 1024
