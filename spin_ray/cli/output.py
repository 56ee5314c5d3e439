"""Where a command's progress, results and logs go: spin_ray's progress lines, the result and errors to the terminal;
under quiet mode everything else (Ray, vLLM and C++ output, through file descriptors 1 and 2) to a log file."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from spin_ray.logs import output_to_file
from spin_ray.models.loading import cache_root

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# The terminal, kept when quiet mode points fd 1 and 2 (and sys.stdout/stderr) at the log file; None: not quiet.
_console: IO[str] | None = None
_console_err: IO[str] | None = None
# --json: stdout carries the result object alone, so progress and the summary go to stderr.
_json = False


def start_output(as_json: bool) -> None:
    """Before the command runs: every log line to the process's stderr; `as_json`: the result alone on stdout."""
    global _json
    _json = as_json
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def say(*lines: str) -> None:
    """Print progress and results to the terminal (stderr under --json)."""
    stream = (_console_err or sys.stderr) if _json else (_console or sys.stdout)
    for line in lines:
        print(line, file=stream, flush=True)


def print_json(result: dict[str, Any]) -> None:
    """--json: the result as one JSON object on the terminal's stdout."""
    print(json.dumps(result, indent=2, default=str), file=_console or sys.stdout, flush=True)


def complain(text: str, *, also_log: bool = False) -> None:
    """Print an error paragraph to the terminal's stderr; `also_log`: into the log file too when quiet (for a
    paragraph no log line carries)."""
    print(text, file=_console_err or sys.stderr, flush=True)
    if also_log and _console_err is not None:
        print(text, file=sys.stderr, flush=True)


class _ConsoleFilter(logging.Filter):
    """spin_ray's own progress lines only: Ray, vLLM and transformers go to the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("spin_ray") and record.levelno >= logging.INFO


def _stamped(command: str) -> str:
    return f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def log_file_for(storage: str, command: str) -> Path:
    """`<storage>/logs/<command>-<time>.log`; object-store runs log under ~/.cache/spin_ray/logs."""
    from spin_ray.data.layout import RunLayout  # deferred (pyarrow): bad input is refused first

    return RunLayout(storage).logs / _stamped(command)


def serve_log_file(target: str) -> Path:
    """A run's `<storage>/logs/serve-<time>.log`; a model folder is not written to, so ~/.cache/spin_ray/logs."""
    from spin_ray.data.layout import RunLayout  # deferred (pyarrow): bad input is refused first

    if Path(RunLayout(str(Path(target).expanduser())).manifest).is_file():
        return log_file_for(target, "serve")
    return cache_root() / "logs" / _stamped("serve")


def quiet_output(log_path: Path) -> None:
    """Send everything written to stdout/stderr (Ray, vLLM and C++ logs included) to `log_path`; keep the terminal
    for spin_ray's progress lines, the results and errors."""
    global _console, _console_err
    terminal_out, terminal_err = os.dup(1), os.dup(2)
    output_to_file(log_path)
    _console = os.fdopen(terminal_out, "w", buffering=1)
    _console_err = os.fdopen(terminal_err, "w", buffering=1)
    # Ray prints the workers' output to sys.stdout/sys.stderr: both go to the file.
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout, force=True)
    terminal = logging.StreamHandler(_console_err if _json else _console)
    terminal.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    terminal.addFilter(_ConsoleFilter())
    logging.getLogger().addHandler(terminal)
    # Progress bars of every Ray Data execution would fill the log; the stage lines say the same.
    import ray.data  # deferred (Ray): bad input is refused first

    ray.data.DataContext.get_current().enable_progress_bars = False


def back_to_terminal() -> None:
    """Point sys.stdout/stderr at the terminal again (for a traceback Python prints next)."""
    if _console is not None:
        sys.stdout, sys.stderr = _console, _console_err


class _LogSink:
    """A stream into the log file that drops what a full disk refuses instead of raising."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def logs_only() -> None:
    """After the command: what Ray's log monitor still prints of the workers' output (it lags the error the driver
    saw) keeps going to the log file, never after the result on the terminal; and a log file on a full disk must
    not turn the exit into an error of its own when Python flushes it at shutdown."""
    if _console is None or isinstance(sys.stdout, _LogSink):
        return
    sys.stdout, sys.stderr = _LogSink(sys.stdout), _LogSink(sys.stderr)
