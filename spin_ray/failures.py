"""A failure inside a stage reaches the caller as one exception: the stage and the root cause in one sentence, not
the layers Ray wraps around a worker's error (task error, dead actor, failed worker group)."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

# The last "pkg.module.SomeError: message" line of a traceback Ray carries as text (a dead actor's creation error).
_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", re.MULTILINE)


class EngineStartError(RuntimeError):
    """An engine could not start; the message names the cause and the setting that fixes it."""


class StageError(RuntimeError):
    """A stage (generation, training, evaluation) failed on the cluster. `stage` names it, `cause` is the root
    cause's message; `ray_error` keeps the exception Ray raised, for a debugger."""

    def __init__(self, stage: str, cause: str, ray_error: BaseException):
        super().__init__(f"{stage} failed: {cause}")
        self.stage, self.cause, self.ray_error = stage, cause, ray_error


def root_cause(error: BaseException) -> str:
    """The innermost error's type and message, through Ray's wrappers."""
    import ray.exceptions

    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, BaseException):
            error = error.cause
        elif isinstance(getattr(error, "worker_failures", None), dict) and error.worker_failures:
            error = next(iter(error.worker_failures.values()))  # Ray Train: the first failed worker's error
        elif isinstance(error, ray.exceptions.RayError):
            raised = _RAISED.findall(str(error))
            if not raised:
                return str(error).splitlines()[0]
            name, message = raised[-1]
            return message if name == EngineStartError.__name__ else f"{name}: {message}"
        elif error.__cause__ is not None:
            error = error.__cause__
        else:
            break
    return str(error) if isinstance(error, EngineStartError) else f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Turn an error Ray raises from the cluster into one StageError naming `name`; spin_ray's own errors (bad
    input, refused settings) pass unchanged."""
    import ray.exceptions
    import ray.train

    try:
        yield
    except (ray.exceptions.RayError, ray.train.TrainingFailedError) as e:
        raise StageError(name, root_cause(e), e) from None
