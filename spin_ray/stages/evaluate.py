"""Stage 5: is θ_{t+1} better than θ_t? Held-out prompts, never trained on, for θ_0 and every iterate.

For θ_k (k = 0 before any training) on the first `eval.rows` prompts of `eval.split`:
- task score of θ_k's greedy answers, where answers can be checked (the bundled tasks, or `eval.scorer`);
- NLL per token of the human answers;
- answer length and the share that hit `generate.max_tokens`;
- the discriminator view (the paper's fixed point, Theorem 5.2): θ_k's implicit reward β[log π_k − log π_{k−1}] ranks
  the human answer above θ_{k−1}'s own sampled answer on `reward_accuracy` of the prompts; it falls toward 0.5 as
  θ_{k−1} approaches the data.
θ_k's sampled answers and log-probs are kept in `eval_samples.parquet`, so θ_{k+1}'s discriminator view needs only
θ_{k+1}'s forward. An evaluation costs two generation passes and one scoring pass over the held-out prompts. In the
loop the answers come from the engines that write iteration k's pairs (or the warm ones), so evaluating θ_k starts no
engine of its own; the scoring pass runs after those engines have given their devices back.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import logging
import math
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from spin_ray.assets.make_tasks import check_answer, task_kind
from spin_ray.config import ConfigError, SpinConfig
from spin_ray.data import records
from spin_ray.data.layout import RunLayout
from spin_ray.data.prepare import prepare
from spin_ray.logs import QUIET_ENV, quiet_ray_data
from spin_ray.models.loading import load_tokenizer, local_model
from spin_ray.stages import harness
from spin_ray.stages.resources import resolve

log = logging.getLogger(__name__)

TaskScorer = Callable[[list[dict[str, str]], str, str], float]


def best_iterate(evaluations: Sequence[dict[str, Any] | None]) -> tuple[int, str] | None:
    """k of the best θ_k among `evaluations` (index k = θ_k's, None where not evaluated) and the measure that chose
    it: the highest held-out task score (ties: lower NLL, then the earlier θ), or the lowest NLL per token where no
    model has a task score. None when no model was evaluated."""
    scored = [(k, e) for k, e in enumerate(evaluations) if e and e.get("task_score") is not None]
    if scored:
        return max(scored, key=lambda ke: (ke[1]["task_score"], -ke[1]["nll_per_token"], -ke[0]))[0], "task_score"
    measured = [(k, e) for k, e in enumerate(evaluations) if e]
    if measured:
        return min(measured, key=lambda ke: (ke[1]["nll_per_token"], ke[0]))[0], "nll_per_token"
    return None


def task_scorer(cfg: SpinConfig) -> TaskScorer | None:
    """`eval.scorer` as a function of (prompt messages, reference answer, model answer) -> score in [0, 1]."""
    name = cfg.eval.scorer
    if name == "none" or (name == "auto" and cfg.data.path != "bundled"):
        return None
    if name == "auto":
        return lambda prompt, reference, answer: float(check_answer(prompt[-1]["content"], answer))
    module, _, function = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"eval.scorer = {name!r}: cannot load it ({e}); give an importable module:function that "
                          "takes (prompt, reference, answer) and returns a number") from e
    return fn


def _kind(prompt: list[dict[str, str]]) -> str | None:
    try:
        return task_kind(prompt[-1]["content"])
    except ValueError:
        return None


def heldout_prompts(cfg: SpinConfig) -> pa.Table:
    """The held-out prompts (at most eval.rows), prepared once into `<storage>/prompts_eval` (a run prepares them at
    its start, so each θ's evaluation only checks they are still its data's)."""
    table = prepare(cfg, heldout=True, say_reused=False).table()
    if table.num_rows == 0:
        raise ConfigError(f"eval.split = {cfg.eval.split!r}: {cfg.data.path} has no rows in that split; name a held-out "
                          "split that exists, or set eval.enabled=false")
    return table


def _answers(engines: list, table: pa.Table, gen_cfg: Any) -> pa.Table:
    """Every row answered by the engines (round-robin chunks), with `gen_cfg`'s sampling."""
    import ray

    ray.get([e.set_sampling.remote(gen_cfg) for e in engines])
    size = math.ceil(table.num_rows / len(engines))
    return pa.concat_tables(ray.get([e.__call__.remote(table.slice(i, size))
                                     for e, i in zip(engines, range(0, table.num_rows, size))]))


def _score_rows(cfg: SpinConfig, model: str, table: pa.Table) -> pa.Table:
    """Adds θ's summed log-probs `logp_real`, `logp_generated` and the pairs' `real_ids` to the rows: the trainer's
    forward in train.dtype (step.pair_logps) on one device, in micro-batches of train.micro_batch_size pairs."""
    import torch

    from spin_ray.training.template import encode_pair
    from spin_ray.training.step import frozen_model, pair_logps

    source = local_model(model)
    trust = dict(trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(source, **trust)
    encoded = [encode_pair(tokenizer, p, r, g, max_length=cfg.data.max_length,
                           max_prompt_length=cfg.data.max_prompt_length)
               for p, r, g in zip(*(table.column(c).to_pylist() for c in ("prompt", "real", "generated")))]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = frozen_model(source, cfg.train, device, **trust)
    size = cfg.train.micro_batch_size
    out = pair_logps(weights, [encoded[i:i + size] for i in range(0, len(encoded), size)], device)
    real = [v for r, _ in out for v in r.tolist()]
    generated = [v for _, g in out for v in g.tolist()]
    return (table.append_column("logp_real", pa.array(real, pa.float64()))
            .append_column("logp_generated", pa.array(generated, pa.float64()))
            .append_column("real_ids", pa.array([e["real_ids"] for e in encoded], pa.list_(pa.int32()))))


def _logps(cfg: SpinConfig, model: str, table: pa.Table) -> pa.Table:
    """`_score_rows` as one Ray task with a training worker's resources."""
    import ray

    task = ray.remote(num_cpus=cfg.train.num_cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0,
                      runtime_env={"env_vars": QUIET_ENV})(_score_rows)
    return ray.get(task.remote(cfg, model, table))


@dataclasses.dataclass
class HeldoutAnswers:
    """The engines' share of θ_k's evaluation: its greedy and sampled answers to the held-out prompts."""
    k: int
    prompts: pa.Table
    greedy: pa.Table
    sampled: pa.Table
    seconds: float


def heldout_answers(cfg: SpinConfig, model: str, k: int, *, pool: Any = None) -> HeldoutAnswers:
    """θ_k's (`model`'s) greedy and sampled answers to the held-out prompts.

    `pool` is an EnginePool already holding θ_k (warm, or the one that also writes iteration k's pairs: one engine
    start for both); without one, engines are started for these answers and stopped after them.
    """
    from spin_ray.stages.generate import EnginePool

    cfg = resolve(cfg)  # GPU requests made explicit, as for the other stages
    prompts = heldout_prompts(cfg)
    start = time.perf_counter()
    own = pool is None
    if own:
        pool = EnginePool.start(cfg, model, k)
    else:
        pool.ready()  # replaces an engine that died since its last use
    try:
        greedy = _answers(pool.engines, prompts, dataclasses.replace(cfg.generate, temperature=0.0))
        sampled = _answers(pool.engines, prompts, cfg.generate)
    finally:
        if own:
            pool.shutdown()
        else:
            _restore(pool, cfg)
    return HeldoutAnswers(k, prompts, greedy, sampled, time.perf_counter() - start)


@quiet_ray_data
def evaluate(cfg: SpinConfig, model: str, k: int, *, pool: Any = None,
             answers: HeldoutAnswers | None = None) -> dict[str, Any]:
    """Evaluate θ_k (`model`) and store `eval.json` + `eval_samples.parquet` in `RunLayout.eval_dir(k)`; with
    eval.lm_eval, lm-eval's scores too (those missing from a stored eval.json are added to it).

    The answers are `answers` (heldout_answers, made earlier on engines that are gone now), else made here on `pool`
    (see heldout_answers). The log-prob pass is one task with a training worker's resources. θ_{k−1}'s evaluation,
    if stored, gives the discriminator view. A stored result is returned as is.
    """
    layout = RunLayout(cfg.storage)
    cached = layout.evaluation(k)
    if cached is not None:
        return _with_lm_eval(cfg, model, k, cached)
    cfg = resolve(cfg)
    if answers is None:
        answers = heldout_answers(cfg, model, k, pool=pool)
    elif answers.k != k:
        raise ValueError(f"answers of θ_{answers.k} given to θ_{k}'s evaluation")
    prompts, greedy, sampled = answers.prompts, answers.greedy, answers.sampled
    start = time.perf_counter()

    previous = _previous_samples(cfg, k)
    base = sampled.select(["prompt_id", "prompt", "real", "generated"])
    to_score = base if previous is None else pa.concat_tables(
        [base, previous.select(["prompt_id", "prompt", "real", "generated"])])
    scored = _logps(cfg, model, to_score)
    own_rows = scored.slice(0, base.num_rows)
    t_logps = time.perf_counter() - start

    result = _metrics(cfg, model, k, prompts, greedy, own_rows, None if previous is None
                      else (previous, scored.slice(base.num_rows)))
    result["seconds"] = {"generate": answers.seconds, "logps": t_logps}
    samples = pa.table({
        "prompt_id": prompts.column("prompt_id"), "prompt": prompts.column("prompt"), "real": prompts.column("real"),
        "greedy": greedy.column("generated"), "greedy_finish_reason": greedy.column("finish_reason"),
        "generated": sampled.column("generated"),
        "logp_real": own_rows.column("logp_real"), "logp_generated": own_rows.column("logp_generated"),
    })
    _write_parquet(layout.eval_samples(k), samples)
    records.write_json_atomic(layout.eval_result(k), result)
    log.info("θ_%d: %s", k, summary(result))
    return _with_lm_eval(cfg, model, k, result)


def _with_lm_eval(cfg: SpinConfig, model: str, k: int, result: dict[str, Any]) -> dict[str, Any]:
    """θ_k's stored evaluation with the eval.lm_eval tasks it lacks scored (harness.py) and written into it."""
    entry = harness.score(cfg, model, result)
    if entry is None:
        return result
    result = {**result, "lm_eval": entry}
    records.write_json_atomic(RunLayout(cfg.storage).eval_result(k), result)
    log.info("θ_%d: lm-eval %s", k, harness.summary(entry))
    return result


def _restore(pool: Any, cfg: SpinConfig) -> None:
    """Give warm engines back their pair-sampling settings."""
    import ray

    ray.get([e.set_sampling.remote(cfg.generate) for e in pool.engines])


def _previous_samples(cfg: SpinConfig, k: int) -> pa.Table | None:
    """θ_{k−1}'s stored held-out samples, matched to this evaluation's prompts (None for θ_0 or if absent)."""
    if k == 0:
        return None
    uri = RunLayout(cfg.storage).eval_samples(k - 1)
    if not RunLayout.done(uri):
        return None
    fs, path = records.filesystem(uri)
    return pq.read_table(path, filesystem=fs)


def _metrics(cfg: SpinConfig, model: str, k: int, prompts: pa.Table, greedy: pa.Table, own: pa.Table,
             versus: tuple[pa.Table, pa.Table] | None) -> dict[str, Any]:
    prompt_list, reals = prompts.column("prompt").to_pylist(), prompts.column("real").to_pylist()
    answers = greedy.column("generated").to_pylist()
    result: dict[str, Any] = {"theta": k, "model": model, "rows": prompts.num_rows, "split": cfg.eval.split}

    scorer = task_scorer(cfg)
    result["task_score"] = result["task_score_by_kind"] = None
    if scorer is not None:
        scores = [float(scorer(p, r, a)) for p, r, a in zip(prompt_list, reals, answers)]
        result["task_score"] = sum(scores) / len(scores)
        by_kind = defaultdict(list)
        for p, s in zip(prompt_list, scores):
            kind = _kind(p)
            if kind:
                by_kind[kind].append(s)
        result["task_score_by_kind"] = {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())} or None

    logp_real = own.column("logp_real").to_pylist()
    # Per token of the human answers as scored: template, EOS and truncation included (the trainer's token ids).
    tokens = sum(len(ids) for ids in own.column("real_ids").to_pylist())
    result["nll_per_token"] = -sum(logp_real) / tokens
    result["answer_tokens"] = sum(greedy.column("generated_tokens").to_pylist()) / greedy.num_rows
    result["truncated_share"] = greedy.column("finish_reason").to_pylist().count("length") / greedy.num_rows

    result["reward_accuracy"] = result["reward_margin"] = None
    if versus is not None:
        previous, now = versus
        before = {pid: (lr, lg) for pid, lr, lg in zip(previous.column("prompt_id").to_pylist(),
                                                        previous.column("logp_real").to_pylist(),
                                                        previous.column("logp_generated").to_pylist())}
        margins = [(lr - before[pid][0]) - (lg - before[pid][1]) for pid, lr, lg in zip(
            now.column("prompt_id").to_pylist(), now.column("logp_real").to_pylist(),
            now.column("logp_generated").to_pylist())]
        beta = cfg.for_iteration(k - 1).train.beta
        # A tie (θ_k = θ_{k−1} on that pair) is a coin flip: it counts half, so an unchanged model scores 0.5.
        result["reward_accuracy"] = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
        result["reward_margin"] = beta * sum(margins) / len(margins)
        result["beta"] = beta
    return result


def summary(result: dict[str, Any]) -> str:
    """One line: task score, NLL, discriminator view, answer length."""
    parts = []
    if result.get("task_score") is not None:
        parts.append(f"task score {result['task_score']:.3f}")
    parts.append(f"NLL/token {result['nll_per_token']:.3f}")
    if result.get("reward_accuracy") is not None:
        parts.append(f"reward acc {result['reward_accuracy']:.3f} margin {result['reward_margin']:.3f}")
    parts.append(f"answer {result['answer_tokens']:.1f} tok ({result['truncated_share']:.0%} hit max_tokens)")
    return ", ".join(parts) + f" on {result['rows']} held-out prompts"


def _write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    records.write_bytes_atomic(uri, buf.getvalue())
