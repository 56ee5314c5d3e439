"""Where a run's internals go: the output of engines and Train workers (vLLM's config dumps, loading bars, worker-group
lines) is written to files under the run's storage instead of reaching the caller's terminal through Ray's log
forwarding, whoever started Ray (`spin-ray`, `ray job submit`, or a program that embeds spin_ray)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from spin_ray.models.loading import cache_root

if TYPE_CHECKING:
    import ray.data

F = TypeVar("F", bound=Callable[..., Any])


def logs_dir(storage: str) -> Path:
    """`<storage>/logs`; runs on an object store log under ~/.cache/spin_ray/logs/<bucket path> on each node."""
    root = Path(storage).expanduser() if "://" not in storage else cache_root() / "logs" / storage.split("://", 1)[1]
    return root.resolve() / "logs"


def output_to_file(path: Path) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so C++ and subprocess output too) at `path`.

    For the processes spin_ray owns (an engine actor, a Train worker): Ray forwards what they print to the driver's
    terminal, and a library caller's terminal is theirs. Errors still reach the caller, as the exceptions Ray raises.
    The CLI's quiet mode points its own process here too, having kept the terminal's descriptors first.
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


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_ray_data(fn: F) -> F:
    """Run `fn` (a library entry point) with Ray Data's console lines limited to errors.

    Ray Data logs each execution's end ("Dataset … execution finished", "Data sink Parquet finished") and a note that
    progress bars are off to the driver's console; spin_ray runs several executions per stage and says the same in
    its own stage lines. Only the console handlers are filtered, only while `fn` runs: Ray Data's log file in the
    Ray session keeps every line, and the caller's own Datasets log as before once `fn` returns.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import ray.data  # noqa: F401  (configures the "ray.data" logger's handlers)

        consoles = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)
                    and not isinstance(h, logging.FileHandler)]
        only_errors = _ErrorsOnly()
        for handler in consoles:
            handler.addFilter(only_errors)
        try:
            return fn(*args, **kwargs)
        finally:
            for handler in consoles:
                handler.removeFilter(only_errors)

    return wrapper  # type: ignore[return-value]
