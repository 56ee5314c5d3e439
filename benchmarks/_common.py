"""Helpers shared by the benchmark scripts (driver side only: Ray workers do not have benchmarks/ on sys.path)."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from typing import TYPE_CHECKING, Callable

import psutil

if TYPE_CHECKING:
    import pyarrow as pa


class RssSampler:
    """Polls this process's descendants in a thread: the peak RSS of each matching one, and how much CPU other
    processes on the machine took meanwhile (`other_cpu_share`, 0..1 of all cores; the machine may be shared).

    torch allocates outside Python's allocator, so tracemalloc misses it; RSS sampling sees everything, at the cost of
    missing peaks shorter than `interval`.
    """

    def __init__(self, label_of: Callable[[psutil.Process], str | None], interval: float = 0.25):
        self.label_of, self.interval = label_of, interval
        self.peaks: dict[int, dict] = {}
        self.other_cpu_share: float | None = None
        self._cpu: dict[int, list[float]] = {}  # pid -> [cpu seconds when first seen, when last seen]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, me: psutil.Process, first: bool = False) -> None:
        # Only our own processes (spawned children, our Ray cluster's workers): another session may run Ray here.
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    c = p.cpu_times()
                    used = c.user + c.system
                    label = None if p is me else self.label_of(p)
                    rss = p.memory_info().rss if label is not None else 0
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            # A process born during the run counts from 0 (its first sample may come late).
            self._cpu.setdefault(p.pid, [used if first else 0.0, used])[1] = used
            if label is None:
                continue
            t = round(time.time() - self.t0, 2)
            peak = self.peaks.setdefault(p.pid, {"pid": p.pid, "label": label, "max_rss_mib": 0.0, "first_seen_s": t})
            peak["label"], peak["last_seen_s"] = label, t  # a Ray worker's title changes as it takes on an actor
            peak["max_rss_mib"] = max(peak["max_rss_mib"], rss / 2**20)

    def _run(self) -> None:
        me = psutil.Process()
        self._sample(me, first=True)
        while not self._stop.wait(self.interval):
            self._sample(me)
        self._sample(me)

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)

    def __enter__(self) -> "RssSampler":
        self.t0, self._busy0 = time.time(), self._busy()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        ours = sum(last - first for first, last in self._cpu.values())
        wall = time.time() - self.t0
        self.other_cpu_share = max(0.0, (self._busy() - self._busy0 - ours) / (wall * (os.cpu_count() or 1)))


def cmdline_containing(*needles: str) -> Callable[[psutil.Process], str | None]:
    """Label a process by its command line (Ray sets it to `ray::<Actor>...`) when it holds one of `needles`."""
    def label_of(p: psutil.Process) -> str | None:
        cmd = " ".join(p.cmdline())
        return cmd[:120] if any(n in cmd for n in needles) else None
    return label_of


def pid_in(pids: set[int], label: str) -> Callable[[psutil.Process], str | None]:
    return lambda p: label if p.pid in pids else None


def synthetic_pairs(tok, n: int, response_tokens: int) -> list[dict]:
    """`n` pairs over the bundled prompts (cycled, unique ids) whose answers are other rows' prompt text cut to a
    fixed token count: realistic lengths, any content will do for speed."""
    from spin_ray.config import DataConfig
    from spin_ray.data.sources import load_sft

    base = load_sft(DataConfig(path="bundled")).rows
    filler = [t for r in base for m in r["prompt"]
              for t in tok(" " + m["content"], add_special_tokens=False)["input_ids"]]

    def answer(i: int) -> str:
        start = (i * 7919) % (len(filler) - response_tokens)
        return tok.decode(filler[start:start + response_tokens])

    return [{"prompt_id": f"{base[i % len(base)]['prompt_id']}-{i // len(base)}",
             "prompt": base[i % len(base)]["prompt"], "real": answer(2 * i), "generated": answer(2 * i + 1)}
            for i in range(n)]


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


def start_ray(**kwargs) -> None:
    """A Ray cluster of our own (address="local", its own temp dir, so that another session's
    ray.init(address="auto") cannot join it and skew the figures), retried: on a loaded machine the raylet can miss
    Ray's fixed 30 s start-up wait."""
    import tempfile

    import ray

    for attempt in range(3):
        try:
            ray.init(address="local", include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-bench-"),
                     **kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for the start-up timeout
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
            print(f"ray.init timed out (load average {loadavg()}); retrying", flush=True)


def read_pairs_table(uris: list[str], columns: list[str] | None = None) -> pa.Table:
    """Complete pairs folders as one pyarrow Table, each in prompt-id order (the training table that the driver read
    before `train.index_pairs`); a missing column or an unfinished folder is an error naming it."""
    import pyarrow as pa  # deferred: a heavy import most benchmarks here do not need

    from spin_ray.data import records
    from spin_ray.data.schemas import PAIRS_COLUMNS

    tables = []
    for uri in uris:
        records.pairs_files(uri, columns)
        # In prompt-id order, not in the order the pipeline happened to write the rows: the same table in every run.
        tables.append(records.read_table(uri).sort_by("prompt_id").select(columns or list(PAIRS_COLUMNS)))
    return pa.concat_tables(tables)
