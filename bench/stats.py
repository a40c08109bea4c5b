"""Percentiles and process-tree sampling (CPU and RSS) for the benchmark reports."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import psutil


def percentile(values: list[float], p: float) -> float:
    """Return the p-th percentile (nearest rank) of values, or NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(seconds: list[float]) -> dict:
    """Return p50/p95/p99/max of latencies given in seconds, in milliseconds."""
    return {
        "count": len(seconds),
        "p50_ms": percentile(seconds, 50) * 1000,
        "p95_ms": percentile(seconds, 95) * 1000,
        "p99_ms": percentile(seconds, 99) * 1000,
        "max_ms": (max(seconds) * 1000) if seconds else math.nan,
    }


def fmt_latency(summary: dict) -> str:
    return (f"n={summary['count']}  p50={summary['p50_ms']:.1f} ms  p95={summary['p95_ms']:.1f} ms  "
            f"p99={summary['p99_ms']:.1f} ms  max={summary['max_ms']:.1f} ms")


def process_tree(pid: int) -> list[psutil.Process]:
    """Return a process and all its descendants (a gunicorn master and its workers)."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    """Return the summed RSS in bytes of a process tree."""
    total = 0
    for proc in process_tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_uss(pid: int) -> int:
    """Return the summed USS (memory unique to each process) in bytes of a process tree."""
    total = 0
    for proc in process_tree(pid):
        try:
            total += proc.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


@dataclass
class Sample:
    t: float
    cpu_percent: float  # summed over the tree; 100 = one core busy
    rss: int


class _Background:
    """A sampler that runs `_run` in a daemon thread between start() and stop()."""

    def _init_thread(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class TreeSampler(_Background):
    """Sample CPU% and RSS of one or more process trees in a background thread."""

    pids: dict[str, int]
    interval: float = 0.5
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._init_thread()
        self._procs: dict[str, dict[int, psutil.Process]] = {name: {} for name in self.pids}
        self._ticks: dict[str, int] = {}
        self.samples = {name: [] for name in self.pids}

    def _refresh(self, name: str, pid: int) -> list[psutil.Process]:
        known = self._procs[name]
        # Listing processes reads /proc for every process on the box: do it every 10th sample only.
        self._ticks[name] = self._ticks.get(name, 0) + 1
        if known and self._ticks[name] % 10 != 1:
            return [p for p in known.values() if p.is_running()]
        if name == "postgres":
            current = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]
        elif name == "loadgen":  # this process only: its children are the servers it started
            current = [psutil.Process(pid)]
        else:
            current = process_tree(pid)
        for proc in current:
            if proc.pid not in known:
                known[proc.pid] = proc
                try:
                    proc.cpu_percent(None)  # prime: the first call always returns 0
                except psutil.NoSuchProcess:
                    pass
        alive = {p.pid for p in current}
        for gone in [p for p in known if p not in alive]:
            del known[gone]
        return [known[p.pid] for p in current]

    def _run(self) -> None:
        for name, pid in self.pids.items():
            if name != "system":
                self._refresh(name, pid)
        psutil.cpu_percent(None)
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            for name, pid in self.pids.items():
                if name == "system":  # the whole machine, all processes (ours and others')
                    busy = psutil.cpu_percent(None) * (psutil.cpu_count() or 1)
                    self.samples[name].append(Sample(now, busy, psutil.virtual_memory().used))
                    continue
                cpu = 0.0
                rss = 0
                for proc in self._refresh(name, pid):
                    try:
                        cpu += proc.cpu_percent(None)
                        rss += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                self.samples[name].append(Sample(now, cpu, rss))

    def summary(self, name: str, since: float | None = None, until: float | None = None) -> dict:
        """Return mean and max CPU% and the max RSS (MB) of one tree over a time window."""
        rows = [s for s in self.samples.get(name, [])
                if (since is None or s.t >= since) and (until is None or s.t <= until)]
        if not rows:
            return {"cpu_mean": math.nan, "cpu_max": math.nan, "rss_max_mb": math.nan}
        return {
            "cpu_mean": sum(s.cpu_percent for s in rows) / len(rows),
            "cpu_max": max(s.cpu_percent for s in rows),
            "rss_max_mb": max(s.rss for s in rows) / 2**20,
        }


def fmt_cpu(name: str, summary: dict) -> str:
    return (f"{name}: CPU mean {summary['cpu_mean']:.0f}% max {summary['cpu_max']:.0f}% "
            f"(100% = one core)  RSS max {summary['rss_max_mb']:.0f} MB")


def machine_busy(seconds: float = 2.0) -> float:
    """Return the machine's CPU use over a short interval (100 = one core), before a run starts."""
    return psutil.cpu_percent(seconds) * (psutil.cpu_count() or 1)


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other work uses less than `threshold`% CPU; return the last reading."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy()
    while busy > threshold and time.monotonic() < deadline:
        print(f"  machine busy {busy:.0f}% (other work); waiting for < {threshold:.0f}%", flush=True)
        time.sleep(5)
        busy = machine_busy()
    return busy


class PgActivitySampler(_Background):
    """Count a database's backends by state and wait event, once a second (pg_stat_activity)."""

    def __init__(self, admin_url: str, dbname: str, interval: float = 1.0) -> None:
        self.admin_url = admin_url
        self.dbname = dbname
        self.interval = interval
        self.samples: list[dict] = []
        self._init_thread()

    def _run(self) -> None:
        import psycopg

        try:
            conn = psycopg.connect(self.admin_url, autocommit=True)
        except psycopg.Error:
            return
        with conn:
            while not self._stop.wait(self.interval):
                rows = conn.execute(
                    "SELECT coalesce(state, '?'), coalesce(wait_event_type || ':' || wait_event, '-'), count(*) "
                    "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() GROUP BY 1, 2",
                    (self.dbname,)).fetchall()
                self.samples.append({f"{state} {wait}": n for state, wait, n in rows})

    def summary(self) -> dict:
        """Return, per state and wait event, the mean and max number of backends."""
        keys = {k for sample in self.samples for k in sample}
        n = len(self.samples) or 1
        return {k: {"mean": round(sum(s.get(k, 0) for s in self.samples) / n, 1),
                    "max": max(s.get(k, 0) for s in self.samples)} for k in sorted(keys)}
