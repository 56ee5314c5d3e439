"""Stage 2: θ_t's summed log-probs of the real and the generated answer, precomputed once per iteration.

The reference is frozen for the whole iteration, so scoring it here (not at every training step, as uclaml/SPIN did)
lets the trainer hold one model and skip one forward per step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pyarrow as pa
import torch

from spin_ray.config import ScoreConfig
from spin_ray.generate import num_gpus_per_actor, resolve_dtype
from spin_ray.template import collate, encode_pair, sequence_logps

NEEDS = ("prompt_id", "prompt", "real", "generated")
ADDS = ("ref_logp_real", "ref_logp_generated")


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision as the trainer runs it: fp32 weights, matmuls in `dtype` (a no-op for float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, dtype))


def score_pairs(model: torch.nn.Module, tokenizer: Any, prompts: list, reals: list[str], generateds: list[str], *,
                max_length: int, max_prompt_length: int, micro_batch_size: int, device: str = "cpu",
                dtype: str = "float32") -> tuple[list[float], list[float]]:
    """log π(real|x) and log π(generated|x) per pair, micro-batched in order of length to limit padding."""
    encoded = [encode_pair(tokenizer, p, r, g, max_length=max_length, max_prompt_length=max_prompt_length)
               for p, r, g in zip(prompts, reals, generateds)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["prompt_ids"]) + max(
        len(encoded[i]["real_ids"]), len(encoded[i]["generated_ids"])))
    real, gen = [0.0] * len(encoded), [0.0] * len(encoded)
    with torch.no_grad(), autocast(device, dtype):
        for start in range(0, len(order), micro_batch_size):
            idx = order[start:start + micro_batch_size]
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], tokenizer.pad_token_id).items()}
            logps = sequence_logps(model, batch).double().cpu().tolist()
            for j, i in enumerate(idx):
                real[i], gen[i] = logps[j], logps[len(idx) + j]
    return real, gen


class Scorer:
    """Ray Data stage: adds `ref_logp_real` and `ref_logp_generated` to batches of generated pairs."""

    def __init__(self, model: str, cfg: ScoreConfig, *, max_length: int, max_prompt_length: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from spin_ray.models import local_model

        model = local_model(model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = resolve_dtype(cfg.dtype, self.device == "cuda")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(self.device).eval()
        self.kwargs = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                           micro_batch_size=cfg.micro_batch_size, device=self.device, dtype=self.dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        missing = [c for c in NEEDS if c not in batch.column_names]
        if missing:
            raise ValueError(f"score stage: input lacks column(s) {missing}; it needs {list(NEEDS)}")
        real, gen = score_pairs(self.model, self.tokenizer, batch.column("prompt").to_pylist(),
                                batch.column("real").to_pylist(), batch.column("generated").to_pylist(),
                                **self.kwargs)
        return (batch.append_column("ref_logp_real", pa.array(real, pa.float64()))
                .append_column("ref_logp_generated", pa.array(gen, pa.float64())))


def score(ds: "ray.data.Dataset", model: str, cfg: ScoreConfig, *, max_length: int,
          max_prompt_length: int) -> "ray.data.Dataset":
    """Lazily add θ_t's reference log-probs to a Dataset of generated pairs."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs=dict(model=model, cfg=cfg, max_length=max_length, max_prompt_length=max_prompt_length),
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=num_gpus_per_actor(cfg.num_gpus_per_actor, 1),
    )
