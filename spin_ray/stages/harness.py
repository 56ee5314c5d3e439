"""EleutherAI's lm-evaluation-harness (lm-eval) on each iterate (`eval.lm_eval`): the yardstick SPIN's paper reports.

θ_k is scored by lm-eval's HF backend (the Open LLM Leaderboard's) in one Ray task with a training worker's resources,
so it runs on the cluster, not in the driver. The scores go into θ_k's eval.json under `lm_eval`, one entry per
configured task with the settings it was run with; a rerun runs only the tasks missing there or run otherwise.
Task names are checked against lm-eval's index (and the include paths) when the config is loaded, and every task's
data is loaded once on the cluster before any engine starts (`check_data`), so a task whose data cannot be reached
is one paragraph naming it.
"""

from __future__ import annotations

import difflib
import functools
import time
from pathlib import Path
from typing import Any

from spin_ray.assets import ASSETS
from spin_ray.config import ConfigError, LmEvalConfig, SpinConfig, resolve_dtype
from spin_ray.models.loading import local_model
from spin_ray.stages.resources import resolve

BUNDLED = ASSETS / "lm_eval_tasks"
"""spin_ray's own task folder, always included: spin_tasks_gen, spin_tasks_ll, spin_tasks, spin_open_llm_leaderboard."""
INSTALL = "pip install 'lm-eval[api,hf]==0.4.13'"
VERSION = 1
"""Bumped when what a stored score means changes, so a rerun scores again."""


def include_paths(lm: LmEvalConfig) -> list[str]:
    return [str(BUNDLED), *([str(Path(lm.include_path).resolve())] if lm.include_path else [])]


@functools.cache
def _task_manager(include: tuple[str, ...], defaults: bool) -> Any:
    """lm-eval's TaskManager over `include` (+ its own ~15k tasks with `defaults`: indexing those takes ~10 s)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"eval.lm_eval.tasks is set, but lm-eval is not installed; {INSTALL}") from None
    return TaskManager(include_path=list(include), include_defaults=defaults)


def task_manager(lm: LmEvalConfig) -> Any:
    """The smallest index that knows every configured task: the include paths alone where they hold them all."""
    own = _task_manager(tuple(include_paths(lm)), False)
    if all(t in own.all_tasks for t in lm.tasks):
        return own
    return _task_manager(tuple(include_paths(lm)), True)


def check_tasks(lm: LmEvalConfig) -> None:
    """ConfigError naming eval.lm_eval.tasks for a name lm-eval does not know (with the closest known names)."""
    if not lm.tasks:
        return
    tm = task_manager(lm)
    for name in lm.tasks:
        if name not in tm.all_tasks:
            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"eval.lm_eval.tasks: {name!r} is not an lm-eval task or group{hint}; use a name that "
                "`lm-eval ls tasks` lists, one of spin_ray's bundled spin_tasks_gen, spin_tasks_ll, spin_tasks, "
                "spin_open_llm_leaderboard, or a task YAML in the folder eval.lm_eval.include_path names")


def settings(lm: LmEvalConfig, task: str) -> dict[str, Any]:
    """What a stored score of `task` was run with; a score stored with other settings is run again."""
    return {"num_fewshot": lm.num_fewshot, "limit": lm.limit, "chat_template": _chat_template(lm, task),
            "version": VERSION}


def _chat_template(lm: LmEvalConfig, task: str) -> bool:
    return lm.chat_template if lm.chat_template is not None else task.startswith("spin_tasks")


def missing(lm: LmEvalConfig, evaluation: dict[str, Any] | None) -> list[str]:
    """The configured tasks without a stored score run with the current settings."""
    stored = (evaluation or {}).get("lm_eval") or {}
    return [t for t in lm.tasks if (stored.get(t) or {}).get("settings") != settings(lm, t)]


def _load(lm: LmEvalConfig, task: str) -> None:
    """Build `task` as lm-eval would (its data loaded, and cached for the run); ConfigError naming it if it cannot."""
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict([task], task_manager(lm))
    except Exception as e:  # lm-eval and datasets raise many kinds; all mean the same to the user here
        raise ConfigError(
            f"eval.lm_eval.tasks: lm-eval could not load the data of {task!r} on the cluster ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}). A task whose data is on the "
            "Hugging Face hub needs the hub reachable from the cluster's nodes (or the data in their HF_DATASETS "
            "cache); offline, use a task folder of your own (eval.lm_eval.include_path) or the bundled "
            "spin_tasks_gen / spin_tasks_ll") from None


def _remote(cfg: SpinConfig, fn: Any, *args: Any) -> Any:
    """`fn(*args)` as a Ray task with a training worker's resources; a ConfigError it raises comes back as itself."""
    import ray

    task = ray.remote(num_cpus=cfg.train.num_cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0)(fn)
    try:
        return ray.get(task.remote(*args))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ConfigError):
            raise ConfigError(str(e.cause)) from None
        raise


def _check_all(lm: LmEvalConfig) -> None:
    for task in lm.tasks:
        _load(lm, task)


def check_data(cfg: SpinConfig) -> None:
    """Every eval.lm_eval task built once on the cluster (where lm-eval will run): one paragraph naming a task whose
    data cannot be reached, before any engine starts. Nothing to do without tasks."""
    if cfg.eval.enabled and cfg.eval.lm_eval.tasks:
        cfg = resolve(cfg)
        _remote(cfg, _check_all, cfg.eval.lm_eval)


def _scores(results: dict[str, Any], groups: dict[str, list[str]], task: str) -> dict[str, dict[str, float]]:
    """`task`'s numbers from lm-eval's results: its own row (a task, or a group that aggregates), else its subtasks'.
    Metric names lose lm-eval's `,none` filter suffix; another filter's name is kept as `metric_filter`."""
    def measured(row: str) -> bool:
        return any("," in key for key in results.get(row, {}))

    rows = [task] if measured(task) else [t for t in groups.get(task, []) if measured(t)]
    out = {}
    for row in rows:
        out[row] = {}
        for key, value in results[row].items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[row][metric if filt == "none" else f"{metric}_{filt}"] = float(value)
    return out


def _run(model: str, cfg: SpinConfig, tasks: list[str]) -> dict[str, Any]:
    """lm-eval's HF backend on `model` for `tasks`, in this process: {task: {settings, scores, seconds}}."""
    import lm_eval
    import torch

    lm = cfg.eval.lm_eval
    on_gpu = torch.cuda.is_available()
    args = {"pretrained": local_model(model), "dtype": resolve_dtype(cfg.train.dtype, on_gpu),
            "device": "cuda" if on_gpu else "cpu", "trust_remote_code": cfg.trust_remote_code}
    out = {}
    for chat in sorted({_chat_template(lm, t) for t in tasks}):  # one lm-eval call per prompt format
        these = [t for t in tasks if _chat_template(lm, t) == chat]
        for task in these:
            _load(lm, task)
        start = time.perf_counter()
        res = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=these, num_fewshot=lm.num_fewshot,
                                      limit=lm.limit, batch_size=lm.batch_size, apply_chat_template=chat,
                                      task_manager=task_manager(lm), log_samples=False)
        seconds = time.perf_counter() - start
        for task in these:
            out[task] = {"settings": settings(lm, task), "scores": _scores(res["results"], res["group_subtasks"], task),
                         "seconds": seconds}
    return out


def score(cfg: SpinConfig, model: str, evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """θ's (`model`'s) lm-eval scores of the configured tasks missing from `evaluation` (its eval.json), run in a
    Ray task and merged with the stored ones: the new `lm_eval` entry, or None when nothing was missing."""
    todo = missing(cfg.eval.lm_eval, evaluation)
    if not todo:
        return None
    cfg = resolve(cfg)  # train.use_gpu made explicit: the task's resources
    return {**(evaluation.get("lm_eval") or {}), **_remote(cfg, _run, model, cfg, todo)}


def summary(entry: dict[str, Any]) -> str:
    """One line of every stored score (stderr left out)."""
    return "; ".join(f"{row} {metric} {value:.3f}" for task in entry.values() for row, metrics in task["scores"].items()
                     for metric, value in metrics.items() if not metric.endswith("_stderr"))
