"""Sample running processes with py-spy and summarise where their time goes.

`py-spy record --format raw` writes collapsed stacks ("frame;frame;frame count"). The summary
gives, per process group, the share of samples spent inside each function (inclusive, for the
app's own code and templates) and the hottest leaf functions (exclusive), which together say
which line of webchat a worker is busy in.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter

from .servers import VENV_BIN

APP_MARKERS = ("webchat/", "templates/", "bench/")


def py_spy() -> str | None:
    path = os.path.join(VENV_BIN, "py-spy")
    return path if os.path.exists(path) else shutil.which("py-spy")


class Recording:
    """py-spy record of some pids for a fixed duration, in the background."""

    def __init__(self, pids: list[int], duration: float, out_dir: str, label: str, rate: int = 100) -> None:
        self.paths: list[str] = []
        self.procs: list[subprocess.Popen] = []
        binary = py_spy()
        if binary is None:
            print("  (py-spy not installed: no profile)")
            return
        os.makedirs(out_dir, exist_ok=True)
        for pid in pids:
            path = os.path.join(out_dir, f"{label}-{pid}.txt")
            self.paths.append(path)
            self.procs.append(subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate", str(rate),
                 "--format", "raw", "--nonblocking", "-o", path],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def wait(self) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, rest = frame.partition(" (")
    path = rest.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:])
    return f"{name} ({short})"


def summarise(paths: list[str], top: int = 15, skip_idle: bool = True) -> str:
    """Return a text summary of collapsed-stack files."""
    inclusive: Counter = Counter()
    sites: Counter = Counter()
    leaf: Counter = Counter()
    total = 0
    idle = 0
    for path in paths:
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for line in lines:
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            last = frames[-1]
            # Greenlets parked in the gevent hub, selectors or socket waits are idle, not busy.
            if skip_idle and any(s in last for s in ("wait (", "select (", "poll (", "_wait_", "switch (",
                                                    "recv (", "recv_into (", "sleep (", "accept (",
                                                    "run (gevent/hub.py", "epoll")):
                idle += n
                continue
            total += n
            leaf[_frame_name(last)] += n
            seen = set()
            for frame in frames:
                if any(m in frame for m in APP_MARKERS):
                    name = _frame_name(frame)
                    if name not in seen:
                        seen.add(name)
                        inclusive[name] += n
                    if frame not in seen:
                        seen.add(frame)
                        sites[frame] += n
    if not total:
        return "  (no busy samples)"
    out = [f"  busy samples {total} (idle {idle}); app frames, inclusive share of busy time:"]
    for name, n in inclusive.most_common(top):
        out.append(f"    {100 * n / total:5.1f}%  {name}")
    out.append("  app lines, inclusive share of busy time:")
    for name, n in sites.most_common(top):
        out.append(f"    {100 * n / total:5.1f}%  {name}")
    out.append("  hottest leaf functions (exclusive):")
    for name, n in leaf.most_common(top):
        out.append(f"    {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)
