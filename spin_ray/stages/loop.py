"""The SPIN recipe as a table of contents. Iteration t: θ_t's engines write the pairs and answer the held-out prompts
(one engine start) → θ_t's evaluation → train θ_{t+1} (its first pass: θ_t's reference log-probs). θ_{t+1} is evaluated
on iteration t+1's engines, the last iterate on its own."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import pyarrow as pa

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.data import records
from spin_ray.data.layout import RunLayout
from spin_ray.data.manifest import Manifest
from spin_ray.data.prepare import Prepared, data_config, data_parts, prepare
from spin_ray.failures import stage
from spin_ray.logs import quiet, quiet_ray_data
from spin_ray.models.builders import resolve_model
from spin_ray.models.loading import check_model
from spin_ray.stages.evaluate import best_iterate, evaluate, heldout_answers
from spin_ray.stages.generate import EnginePool, generate
from spin_ray.stages.harness import check_data, check_tasks
from spin_ray.stages.resources import preflight
from spin_ray.stages.tracking import Tracker, check_backend

log = logging.getLogger(__name__)


@dataclass
class PairsResult:
    path: str
    rows: int
    skipped: bool
    """True when finished pairs were already there and nothing was recomputed."""
    seconds: dict[str, float] = field(default_factory=dict)
    bad_rows: dict[str, int] = field(default_factory=dict)

    def dataset(self) -> "ray.data.Dataset":
        import ray.data

        return quiet(ray.data.read_parquet(self.path, file_extensions=["parquet"]))


STAGES = {"Generator": "generate", "PooledGenerator": "generate"}


def _busy_seconds(stats: str) -> dict[str, float]:
    """Summed actor time per stage from Ray Data's stats text: the engines' busy time, beside the stage's wall time
    (which also counts start-up and the write)."""
    out = {}
    for name, value, unit in re.findall(r"Operator \d+ [^\n]*?MapBatches\((\w+)\)[^\n]*\n\* Remote wall time:"
                                        r"[^\n]*?([\d.]+)(ms|s|us) total", stats):
        if name in STAGES:
            out[STAGES[name]] = float(value) / {"s": 1, "ms": 1e3, "us": 1e6}[unit]
    return out


Prompts = Union[Prepared, pa.Table, "ray.data.Dataset", None]
Model = Union[str, "ray.train.Checkpoint", None]


def model_path(model: Model, cfg: SpinConfig) -> str:
    """A local folder, URI or hub id for θ_t, from a path, a Ray Train Checkpoint or `cfg.model`; a local folder is
    checked (check_model) here, in the driver, before any stage starts."""
    if model is None or isinstance(model, str):
        path = resolve_model(model or cfg.model)
    else:
        import pyarrow.fs as pafs

        local = isinstance(model.filesystem, pafs.LocalFileSystem)
        path = resolve_model(model.path if local else f"{model.filesystem.type_name}://{model.path}")
    check_model(path, cfg.trust_remote_code)
    return path


def as_prompts(prompts: Prompts, cfg: SpinConfig) -> Prepared:
    """The prepared prompts folder (prepare.py) of `cfg.data` (None), a Ray Dataset or a pyarrow table of SFT rows
    in any accepted shape (data/sources.py; an already normalised one is taken as it is). The rows go through Ray Data,
    never through the driver; an already prepared folder is passed on."""
    return prompts if isinstance(prompts, Prepared) else prepare(cfg, prompts)


@quiet_ray_data
def make_pairs(cfg: SpinConfig, prompts: Prompts = None, *, model: Model = None,
               pool: EnginePool | None = None) -> PairsResult:
    """One iteration's pairs under `<storage>/iter_<t>/pairs`: θ_t answers every prompt (with the pair's token ids).

    `prompts` default to `cfg.data` (see `as_prompts`); `model` (θ_t) defaults to `cfg.model`; a warm engine `pool`
    must already hold θ_t. A finished pairs folder is kept as it is.
    """
    cfg = preflight(cfg, stages=("pairs",))
    layout = RunLayout(cfg.storage)
    dest = layout.pairs(cfg.iteration)
    if layout.done(dest):
        rows = records.marker(dest)["rows"]
        log.info("iteration %d: pairs already at %s (%d rows); skipping generation", cfg.iteration, dest, rows)
        return PairsResult(dest, rows, skipped=True)

    prompts = as_prompts(prompts, cfg)  # CPU only: bad data is refused before any engine starts
    model = model_path(model, cfg)
    g = cfg.generate

    start = time.perf_counter()
    own = None
    with stage("generation"):
        # Engines started here, not by Ray Data: one that cannot start fails once, with its cause, and is not retried.
        if pool is None:
            pool = own = EnginePool.start(cfg, model, cfg.iteration)
        try:
            log.info("iteration %d: generating answers to %d prompts with %s", cfg.iteration, prompts.rows, model)
            # Streamed from the prepared folder in blocks of one generation batch, so every engine has work queued.
            ds = prompts.dataset(rows_per_block=g.batch_size)
            lengths = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
            ds = generate(ds, model, g, iteration=cfg.iteration, seed=cfg.seed, pool=pool, **lengths,
                          trust_remote_code=cfg.trust_remote_code)
            stats = records.write_pairs(ds, dest, expected_rows=prompts.rows)
        finally:
            if own is not None:
                own.shutdown()
    seconds = {"pairs": time.perf_counter() - start, **_busy_seconds(ds.stats())}
    log.info("iteration %d: wrote %d pairs to %s in %.1f s", cfg.iteration, stats["rows"], dest, seconds["pairs"])
    return PairsResult(dest, stats["rows"], skipped=False, seconds=seconds, bad_rows=prompts.bad)


@dataclass
class IterationResult:
    iteration: int
    model: str
    """θ_{t+1}: an HF folder that transformers and vLLM load."""
    pairs: PairsResult
    metrics: dict[str, Any]
    """The last optimizer step's metrics (train_metrics.jsonl has every step)."""
    seconds: dict[str, float]
    evaluation: dict[str, Any] | None = None
    """θ_{t+1} on the held-out prompts (evaluate.py; `iter_<t>/eval.json`), None with eval.enabled=false."""
    evaluation_before: dict[str, Any] | None = None
    """θ_t on the same prompts, for comparison."""

    @property
    def checkpoint(self) -> "ray.train.Checkpoint":
        import ray.train

        fs, path = records.filesystem(self.model)
        return ray.train.Checkpoint(path, filesystem=fs)


@dataclass
class _Opponent:
    """θ_t's share of iteration t: its pairs and its held-out evaluation."""
    model: str
    pairs: PairsResult
    evaluation: dict[str, Any] | None
    seconds: dict[str, float]


def _opponent(cfg: SpinConfig, prompts: Prompts, model: str, pool: EnginePool | None) -> _Opponent:
    """θ_t's engine work on one engine start: the held-out answers of θ_t's evaluation (unless it is stored) and the
    iteration's pairs. Then, with those engines gone and their devices free, the evaluation's log-prob pass."""
    t = cfg.iteration
    layout = RunLayout(cfg.storage)
    start = time.perf_counter()
    heldout = cfg.eval.enabled and not layout.done(layout.eval_result(t))
    own = None
    if pool is None and heldout and not layout.done(layout.pairs(t)):
        with stage("generation"):
            pool = own = EnginePool.start(cfg, model, t)
    engines = time.perf_counter() - start  # starting them, as iteration t's first stage
    try:
        with stage("evaluation"):
            answers = heldout_answers(cfg, model, t, pool=pool) if heldout else None
        t1 = time.perf_counter()
        pairs = make_pairs(cfg, prompts, model=model, pool=pool)  # a finished iteration reads no prompts
        t2 = time.perf_counter()
    finally:
        if own is not None:
            own.shutdown()
    with stage("evaluation"):
        evaluation = evaluate(cfg, model, t, answers=answers) if cfg.eval.enabled else None
    seconds = {**pairs.seconds, "engines": engines, "pairs": t2 - t1,
               "eval": t1 - start - engines + time.perf_counter() - t2}
    return _Opponent(model, pairs, evaluation, seconds)


def _learn(cfg: SpinConfig, opponent: _Opponent, pool: EnginePool | None, evaluate_after: bool) -> IterationResult:
    """θ_{t+1} trained against θ_t (its first pass: θ_t's reference log-probs), and evaluated if `evaluate_after`."""
    from spin_ray.stages.train import train

    t = cfg.iteration
    start = time.perf_counter()
    trained = train(cfg, model=opponent.model)
    t_train = time.perf_counter() - start
    after = None
    if evaluate_after and cfg.eval.enabled:
        with stage("evaluation"):
            if pool is not None:
                pool.reload(trained.model, t + 1)
            after = evaluate(cfg, trained.model, t + 1, pool=pool)
    seconds = {**opponent.seconds, "train": t_train, "reference": trained.reference_seconds,
               "eval": opponent.seconds["eval"] + time.perf_counter() - start - t_train}
    return IterationResult(t, trained.model, opponent.pairs, trained.metrics, seconds, after, opponent.evaluation)


@quiet_ray_data
def run_iteration(cfg: SpinConfig, prompts: Prompts = None, *, model: Model = None,
                  pool: EnginePool | None = None) -> IterationResult:
    """Iteration `cfg.iteration`: θ_t (`model`, default cfg.model) → pairs → θ_{t+1} → held-out evaluation of both.

    θ_t's engines write the pairs and answer θ_t's held-out prompts on one start; θ_{t+1}'s evaluation starts its
    own (`run` instead evaluates it on iteration t+1's engines). Finished stages are kept. A warm `pool` holding θ_t
    is left holding θ_{t+1}.
    """
    cfg = preflight(cfg)
    model = model_path(model, cfg)
    return _learn(cfg, _opponent(cfg, prompts, model, pool), pool, evaluate_after=True)


def check_storage(cfg: SpinConfig) -> None:
    """Multi-node runs need storage every node sees: Train checkpoints and pairs are written from any node."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in cfg.storage and not cfg.storage_shared:
        raise ConfigError(
            f"storage = {cfg.storage!r} is a node-local path, but the cluster has {len(nodes)} nodes. Use shared "
            "storage: an s3:// or gs:// URI, or a shared mount (NFS/EFS) at the same path on every node together "
            "with storage_shared=true")


def check_storage_writable(storage: str) -> None:
    """A local `storage` must be a folder this process can write: its first write comes after generation, too late
    to find out. Creates the folder if missing and writes and removes one probe file in it;
    nothing already there is touched."""
    if "://" in storage:
        return
    path = Path(storage).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"storage = {storage!r}: {existing} is a file, not a folder; set storage to a new or "
                          "existing folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"storage = {storage!r} is not writable ({e.strerror}: {e.filename}); choose a folder "
                          "you can write, or fix its permissions") from None


def check_inputs(cfg: SpinConfig, command: str) -> None:
    """What the user supplies for `command` (prepare, generate, train, run), refused in one paragraph before Ray
    starts: storage, tracking, θ_0's folder and where the data files are. Their rows are read on the cluster by the
    prepare stage, the first step of generate and run, which refuses bad rows before any GPU work."""
    if command != "train":  # lists the files only: a wrong path or split is refused now
        data_parts(cfg.data)
    if command in ("prepare", "run") and cfg.eval.enabled:
        data_parts(data_config(cfg, heldout=True))
    if command == "run":
        check_backend(cfg.tracking)
        check_tasks(cfg.eval.lm_eval)
    if command != "prepare":
        check_model(resolve_model(cfg.model), cfg.trust_remote_code)
    check_storage_writable(cfg.storage)  # last: it creates the folder


@quiet_ray_data
def run(cfg: SpinConfig, prompts: Prompts = None, *, force: bool = False,
        on_iteration: Callable[[IterationResult], None] | None = None) -> list[IterationResult]:
    """The self-play loop: iterations 0..T−1, each starting from the last one's θ, resuming finished work.

    `prompts` default to `cfg.data` (see `as_prompts`; prepared once for every iteration). `on_iteration` is
    called after each iteration (progress). Needs Ray to be initialised (the CLI does it; inside a Ray program it is
    already up).
    """
    # Before the warm engines or any stage start; the manifest keeps the config as the user wrote it.
    resolved = preflight(cfg)
    check_storage(cfg)
    check_storage_writable(cfg.storage)  # library callers skip the CLI's check_inputs
    check_tasks(cfg.eval.lm_eval)
    prompts = as_prompts(prompts, cfg)
    if cfg.eval.enabled:
        prepare(cfg, heldout=True)  # its bad rows, too, before any GPU work
        check_data(cfg)  # eval.lm_eval's task data, loaded on the cluster: one unreachable stops the run here
    layout, manifest = RunLayout(cfg.storage), Manifest(cfg.storage)
    manifest.check(cfg, prompts.fingerprint, force=force)
    tracker = Tracker(cfg) if cfg.tracking.backend != "none" else None
    model, results, pool, pending, ok = model_path(None, cfg), [], None, None, False

    def finish(result: IterationResult) -> None:
        if cfg.eval.enabled and result.evaluation is None:  # θ_{t+1}'s, made by iteration t+1 (or stored before)
            result.evaluation = layout.evaluation(result.iteration + 1)
        manifest.stage(f"iter_{result.iteration}", "done", model=result.model, seconds=result.seconds,
                       metrics=result.metrics, evaluation=result.evaluation)
        results.append(result)
        if tracker:
            tracker.sync()
        if on_iteration:
            on_iteration(result)

    try:
        for t in range(cfg.loop.iterations):
            c = resolved.for_iteration(t)
            if _stopped(c, manifest):  # θ_t's stored evaluation is at the fixed point: no engine starts
                break
            pool, warming = _warm(c, model, pool)
            manifest.stage(f"iter_{t}", "running", model=model)
            opponent = _opponent(c, prompts, model, pool)
            opponent.seconds["engines"] += warming
            if pending is not None:  # iteration t−1 ends with θ_t's evaluation, made on this iteration's engines
                finish(pending)
                pending = None
            if _stopped(c, manifest):  # its pairs are written, and kept for a rerun with another ε
                break
            pending = _learn(c, opponent, pool, evaluate_after=t == cfg.loop.iterations - 1)
            model = pending.model
        if pending is not None:
            finish(pending)
        ok = True
    finally:
        if pool is not None:
            pool.shutdown()
        if tracker:
            tracker.close(ok)
    _select(cfg, manifest, [model_path(None, cfg), *(r.model for r in results)])
    return results


def _select(cfg: SpinConfig, manifest: "Manifest", models: list[str]) -> None:
    """Record the iterate the run keeps (loop.select) among θ_0 … θ_T (`models`)."""
    theta, by = len(models) - 1, None
    evaluations = [RunLayout(cfg.storage).evaluation(k) for k in range(len(models))]
    if cfg.loop.select == "best":
        theta, by = best_iterate(evaluations) or (theta, None)
    value = (evaluations[theta] or {}).get(by) if by else None
    manifest.select(theta, models[theta], cfg.loop.select, by, value)
    how = f"the best held-out {by.replace('_', ' ')}, {value:.3f}" if by else f"loop.select = {cfg.loop.select}"
    log.info("keeping θ_%d (%s): %s", theta, how, models[theta])


def at_fixed_point(reward_accuracy: float | None, epsilon: float | None) -> bool:
    """θ_t's held-out reward accuracy against θ_{t−1} is within ε of 0.5: θ_t can no longer tell the human answers from
    θ_{t−1}'s, the paper's stopping point (p_θ = p_data)."""
    return epsilon is not None and reward_accuracy is not None and abs(reward_accuracy - 0.5) <= epsilon


def _stopped(c: SpinConfig, manifest: "Manifest") -> bool:
    """θ_t's stored held-out evaluation puts it at the fixed point (loop.early_stop_epsilon): no iteration t."""
    t = c.iteration
    accuracy = (RunLayout(c.storage).evaluation(t) or {}).get("reward_accuracy")
    if not at_fixed_point(accuracy, c.loop.early_stop_epsilon):
        return False
    log.info("stopping before iteration %d: θ_%d's held-out reward accuracy %.3f is within %g of 0.5", t, t, accuracy,
             c.loop.early_stop_epsilon)
    manifest.stage(f"iter_{t}", "stopped", heldout_accuracy=accuracy)
    return True


def _warm(c: SpinConfig, model: str, pool: EnginePool | None) -> tuple[EnginePool | None, float]:
    """With generate.keep_warm, the loop's engines brought to θ_t (started once, then reloaded in place), unless
    iteration t is finished; and the seconds that took."""
    layout = RunLayout(c.storage)
    if not c.generate.keep_warm or layout.done(layout.model(c.iteration)):
        return pool, 0.0
    start = time.perf_counter()
    with stage("generation"):
        if pool is None:
            pool = EnginePool.start(c, model, c.iteration)
        elif pool.model != model:
            pool.reload(model, c.iteration)
    return pool, time.perf_counter() - start
