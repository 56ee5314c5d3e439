"""Where a run's internals go: the output of engines and Train workers (vLLM's config dumps, loading bars, worker-group
lines) is written to files under the run's storage instead of reaching the caller's terminal through Ray's log
forwarding, whoever started Ray (`spin-ray`, `ray job submit`, or a program that embeds spin_ray)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def logs_dir(storage: str) -> Path:
    """`<storage>/logs`; runs on an object store log under ~/.cache/spin_ray/logs/<bucket path> on each node."""
    from spin_ray.models import cache_root

    root = Path(storage).expanduser() if "://" not in storage else cache_root() / "logs" / storage.split("://", 1)[1]
    return root.resolve() / "logs"


def output_to_file(path: Path) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so C++ and subprocess output too) at `path`.

    For the processes spin_ray owns (an engine actor, a Train worker): Ray forwards what they print to the driver's
    terminal, and a library caller's terminal is theirs. Errors still reach the caller, as the exceptions Ray raises.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    sink = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)


QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
"""For the processes spin_ray starts: no tokenizer thread-pool warnings after a fork, no weight-loading bars."""

QUIET_DATA = {"enable_progress_bars": False, "print_on_execution_start": False}
"""Ray Data settings of the executions spin_ray runs: a progress block every few seconds per execution would fill the
caller's terminal; spin_ray's stage lines say the same."""


def quiet(ds: "ray.data.Dataset") -> "ray.data.Dataset":
    """`ds` (made by spin_ray, so its DataContext is its own copy) without Ray Data's progress output."""
    for key, value in QUIET_DATA.items():
        setattr(ds.context, key, value)
    return ds
