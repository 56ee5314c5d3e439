"""The SPIN recipe as a table of contents: prompts → generate (θ_t) → score (θ_t) → write pairs → train θ_{t+1}."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
import pyarrow as pa

from spin_ray import records
from spin_ray.config import ConfigError, SpinConfig
from spin_ray.data import PROMPT_SCHEMA, load_sft
from spin_ray.generate import generate, num_gpus_per_actor
from spin_ray.models import resolve_model
from spin_ray.score import score

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

        return ray.data.read_parquet(self.path, file_extensions=["parquet"])


def require_resources(what: str, field_name: str, count: int, per_unit: dict[str, float]) -> None:
    """Fail before any actor starts when the cluster can never fit `count` units (Ray would wait forever)."""
    import ray

    total = ray.cluster_resources()
    for resource, amount in per_unit.items():
        if amount and count * amount > total.get(resource, 0) + 1e-9:
            raise ConfigError(
                f"{field_name} = {count} needs {count * amount:g} {resource} for {what}, but the cluster has "
                f"{total.get(resource, 0):g}; lower {field_name} or the per-unit request, or add nodes")


def make_pairs(cfg: SpinConfig, prompts: pa.Table | None = None, *, model: str | None = None) -> PairsResult:
    """One iteration's pairs under `<storage>/iter_<t>/pairs`: θ_t answers every prompt, then scores both answers.

    `prompts` (normalised prompt_id/prompt/real rows) defaults to `cfg.data`; `model` (θ_t) defaults to `cfg.model`.
    A finished pairs folder is kept as it is.
    """
    dest = records.join(records.iter_dir(cfg.storage, cfg.iteration), "pairs")
    if records.is_complete(dest):
        rows = records.read_json(records.join(dest, records.MARKER))["rows"]
        log.info("iteration %d: pairs already at %s (%d rows); skipping generate and score", cfg.iteration, dest, rows)
        return PairsResult(dest, rows, skipped=True)

    model = resolve_model(model or cfg.model)
    bad: dict[str, int] = {}
    if prompts is None:
        sft = load_sft(cfg.data)
        prompts, bad = sft.to_arrow(), dict(sft.bad)
    missing = [c for c in PROMPT_SCHEMA.names if c not in prompts.column_names]
    if missing:
        raise ConfigError(f"prompts lack column(s) {missing}; build them with spin_ray.data.normalize")
    g, s = cfg.generate, cfg.score
    require_resources("generation actors", "generate.num_actors", g.num_actors,
                      {"CPU": g.num_cpus_per_actor, "GPU": num_gpus_per_actor(g.num_gpus_per_actor, g.tensor_parallel_size)})
    require_resources("scoring actors", "score.num_actors", s.num_actors,
                      {"CPU": s.num_cpus_per_actor, "GPU": num_gpus_per_actor(s.num_gpus_per_actor, 1)})

    import ray.data

    log.info("iteration %d: generating and scoring %d prompts with %s", cfg.iteration, prompts.num_rows, model)
    start = time.perf_counter()
    # One block per generation batch, so every actor in the pool has work queued.
    ds = ray.data.from_arrow([prompts.slice(i, g.batch_size) for i in range(0, prompts.num_rows, g.batch_size)])
    lengths = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    ds = generate(ds, model, g, iteration=cfg.iteration, seed=cfg.seed, **lengths)
    ds = score(ds, model, s, **lengths)
    stats = records.write_pairs(ds, dest, expected_ids=set(prompts.column("prompt_id").to_pylist()))
    seconds = {"generate+score": time.perf_counter() - start}
    log.info("iteration %d: wrote %d pairs to %s in %.1f s", cfg.iteration, stats["rows"], dest,
             seconds["generate+score"])
    return PairsResult(dest, stats["rows"], skipped=False, seconds=seconds, bad_rows=bad)
