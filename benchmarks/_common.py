"""Helpers shared by the benchmark scripts (driver side only: Ray workers do not have benchmarks/ on sys.path)."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from typing import Callable

import psutil


class RssSampler:
    """Polls the RSS of this process's descendants in a thread and keeps each matching one's peak.

    torch allocates outside Python's allocator, so tracemalloc misses it; RSS sampling sees everything, at the cost of
    missing peaks shorter than `interval`.
    """

    def __init__(self, label_of: Callable[[psutil.Process], str | None], interval: float = 0.25):
        self.label_of, self.interval = label_of, interval
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            # Only our own processes (spawned children, our Ray cluster's workers): another session may run Ray here.
            for p in me.children(recursive=True):
                try:
                    label = self.label_of(p)
                    if label is None:
                        continue
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                t = round(time.time() - self.t0, 2)
                peak = self.peaks.setdefault(p.pid, {"pid": p.pid, "label": label, "max_rss_mib": 0.0,
                                                     "first_seen_s": t})
                peak["label"], peak["last_seen_s"] = label, t  # a Ray worker's title changes as it takes on an actor
                peak["max_rss_mib"] = max(peak["max_rss_mib"], rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.t0 = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def matching(self, text: str) -> list[dict]:
        return sorted((v for v in self.peaks.values() if text in v["label"]), key=lambda v: v["pid"])


def cmdline_containing(*needles: str) -> Callable[[psutil.Process], str | None]:
    """Label a process by its command line (Ray sets it to `ray::<Actor>...`) when it holds one of `needles`."""
    def label_of(p: psutil.Process) -> str | None:
        cmd = " ".join(p.cmdline())
        return cmd[:120] if any(n in cmd for n in needles) else None
    return label_of


def pid_in(pids: set[int], label: str) -> Callable[[psutil.Process], str | None]:
    return lambda p: label if p.pid in pids else None


def machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "gpu": False}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[h for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) if k and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}"
    return str(c)


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"\nresults written to {path}")


def now() -> float:
    return time.perf_counter()
