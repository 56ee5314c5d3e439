"""Held-out discrimination: can θ_t still tell the human answers from its own? (The paper's stopping signal.)"""

from __future__ import annotations

import dataclasses
import logging

from spin_ray import records
from spin_ray.config import SpinConfig
from spin_ray.data import load_sft
from spin_ray.generate import generate
from spin_ray.score import score

log = logging.getLogger(__name__)


def heldout_accuracy(cfg: SpinConfig, model: str, previous: str) -> float:
    """Share of held-out prompts where θ_t's implicit reward r = log π_t − log π_{t−1} ranks the human answer above
    an answer θ_t samples itself. At the fixed point p_θt = p_data (Theorem 5.2) this is 0.5.

    Cached in `<storage>/iter_<t>/heldout.json`.
    """
    import ray.data

    cache = records.join(records.iter_dir(cfg.storage, cfg.iteration), "heldout.json")
    if records.exists(cache):
        return records.read_json(cache)["accuracy"]
    prompts = load_sft(dataclasses.replace(cfg.data, split=cfg.loop.eval_split, max_rows=cfg.loop.eval_rows)).to_arrow()
    lengths = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    ds = ray.data.from_arrow(prompts)
    ds = generate(ds, model, cfg.generate, iteration=cfg.iteration, seed=cfg.seed + 1, **lengths)
    ds = score(ds, model, cfg.score, **lengths).rename_columns(
        {"ref_logp_real": "logp_real", "ref_logp_generated": "logp_generated"})
    rows = score(ds, previous, cfg.score, **lengths).select_columns(
        ["logp_real", "logp_generated", "ref_logp_real", "ref_logp_generated"]).take_all()
    margins = [(r["logp_real"] - r["ref_logp_real"]) - (r["logp_generated"] - r["ref_logp_generated"]) for r in rows]
    # A tie (θ_t = θ_{t−1} on that pair) is a coin flip: it counts half, so an unchanged model scores exactly 0.5.
    accuracy = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    records.write_json_atomic(cache, {"accuracy": accuracy, "rows": len(margins), "model": model, "previous": previous})
    log.info("iteration %d: held-out reward accuracy of θ_%d is %.3f on %d prompts", cfg.iteration, cfg.iteration,
             accuracy, len(margins))
    return accuracy
