"""Stage 2: θ_t's summed log-probs of the real and the generated answer, precomputed once per iteration.

The reference is frozen for the whole iteration, so scoring it here (not at every training step, as uclaml/SPIN did)
lets the trainer hold one model and skip one forward per step. The scorer also tokenises and truncates each pair once
(template.py's rule) and keeps the token ids with the pairs: the trainer reads them and never tokenises again.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import torch

from spin_ray import records
from spin_ray.config import ConfigError, ScoreConfig, SpinConfig, resolve_dtype
from spin_ray.plan import actor_gpus
from spin_ray.schemas import IDS, LOGPS
from spin_ray.template import encode_pair, pack_varlen, varlen_logps

log = logging.getLogger(__name__)

NEEDS = ("prompt_id", "prompt", "real", "generated")
ADDS = (*IDS, *LOGPS)


def cast_parameters(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Parameters in `dtype`, buffers (rotary frequencies) left in fp32: the compute copy that the trainer's FSDP2
    MixedPrecisionPolicy(param_dtype) all-gathers, so log π_t here equals the trainer's log πθ at step 0."""
    for p in model.parameters():
        p.data = p.data.to(getattr(torch, dtype))
    return model


def score_encoded(model: torch.nn.Module, encoded: list[dict[str, list[int]]], *, micro_batch_size: int,
                  device: str = "cpu") -> tuple[list[float], list[float]]:
    """log π(real|x) and log π(generated|x) per encoded pair, `micro_batch_size` pairs per forward in the trainer's
    layout and attention (template.pack_varlen: whole sequences flattened, no padding), so that at step 0 the trainer
    computes these same numbers."""
    real: list[float] = []
    gen: list[float] = []
    with torch.no_grad():
        for start in range(0, len(encoded), micro_batch_size):
            batch = {k: v.to(device) for k, v in pack_varlen(encoded[start:start + micro_batch_size]).items()}
            r, g = varlen_logps(model, batch)
            real += r.double().cpu().tolist()
            gen += g.double().cpu().tolist()
    return real, gen


class Scorer:
    """Ray Data stage: adds the token ids (unless the batch has them: rescoring) and `ref_logp_real`,
    `ref_logp_generated` to batches of generated pairs."""

    def __init__(self, model: str, cfg: ScoreConfig, *, max_length: int, max_prompt_length: int,
                 trust_remote_code: bool = False):
        from spin_ray.models import load_model, load_tokenizer, local_model

        model = local_model(model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        weights = load_model(model, dtype=torch.float32, trust_remote_code=trust_remote_code)
        self.model = cast_parameters(weights, resolve_dtype(cfg.dtype, self.device == "cuda")).to(self.device).eval()
        self.lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length)
        self.micro_batch_size = cfg.micro_batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        missing = [c for c in NEEDS if c not in batch.column_names]
        if missing:
            raise ValueError(f"score stage: input lacks column(s) {missing}; it needs {list(NEEDS)}")
        if set(IDS) <= set(batch.column_names):
            encoded = batch.select(list(IDS)).to_pylist()
        else:
            encoded = [encode_pair(self.tokenizer, p, r, g, **self.lengths) for p, r, g in zip(
                batch.column("prompt").to_pylist(), batch.column("real").to_pylist(),
                batch.column("generated").to_pylist())]
            for key in IDS:
                batch = batch.append_column(key, pa.array([e[key] for e in encoded], pa.list_(pa.int32())))
        real, gen = score_encoded(self.model, encoded, micro_batch_size=self.micro_batch_size, device=self.device)
        return (batch.append_column("ref_logp_real", pa.array(real, pa.float64()))
                .append_column("ref_logp_generated", pa.array(gen, pa.float64())))


def score(ds: "ray.data.Dataset", model: str, cfg: ScoreConfig, *, max_length: int, max_prompt_length: int,
          trust_remote_code: bool = False) -> "ray.data.Dataset":
    """Lazily add θ_t's reference log-probs (and the pairs' token ids) to a Dataset of generated pairs."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs=dict(model=model, cfg=cfg, max_length=max_length, max_prompt_length=max_prompt_length,
                                   trust_remote_code=trust_remote_code),
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=actor_gpus(cfg.num_gpus_per_actor, 1),
    )


def window_iterations(cfg: SpinConfig) -> range:
    """The earlier iterations whose pairs iteration t also trains on (loop.window)."""
    return range(max(0, cfg.iteration - cfg.loop.window + 1), cfg.iteration)


def rescore_window(cfg: SpinConfig, model: str) -> list[str]:
    """Earlier iterations' pairs in this iteration's window, their reference log-probs recomputed under θ_t (`model`)
    into `iter_<t>/window/iter_<s>`; finished ones are kept.

    uclaml/SPIN trains iteration t on its own and the previous iteration's pairs with θ_t as the reference for both
    (paper §5.1; its configs/config_iter{1,2,3}.yaml use a window of two iterations); the older y' stay as θ_{t-1} sampled them, with the token ids they were scored with.
    """
    import ray.data

    here = records.iter_dir(cfg.storage, cfg.iteration)
    out = []
    for s in window_iterations(cfg):
        dest = records.join(here, f"window/iter_{s}")
        out.append(dest)
        if records.is_complete(dest):
            continue
        source_uri = records.join(records.iter_dir(cfg.storage, s), "pairs")
        if not records.is_complete(source_uri):
            raise ConfigError(
                f"iteration {cfg.iteration} trains on its own pairs and those of the loop.window = {cfg.loop.window} "
                f"- 1 iterations before it, but iteration {s}'s pairs at {source_uri} are not finished: run "
                f"`spin-ray generate --set iteration={s} --set model=<θ_{s}>` with the same storage first, or lower "
                f"loop.window")
        source = records.read_pairs_table([source_uri])
        log.info("iteration %d: rescoring iteration %d's %d pairs under θ_%d", cfg.iteration, s, source.num_rows,
                 cfg.iteration)
        step = cfg.score.batch_size
        ds = ray.data.from_arrow([source.drop_columns(list(LOGPS)).slice(i, step)
                                  for i in range(0, source.num_rows, step)])
        ds = score(ds, model, cfg.score, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                   trust_remote_code=cfg.trust_remote_code)
        records.write_pairs(ds, dest, expected_ids=set(source.column("prompt_id").to_pylist()))
    return out
