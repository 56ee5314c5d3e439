"""train.compile: each decoder block compiled once with dynamic shapes and traced whole (the varlen attention is a
registered op), so micro-batches of new lengths neither break the graph nor recompile; losses equal eager's."""

from __future__ import annotations

import random

import pytest
import torch

from spin_ray.config import TrainConfig
from spin_ray.training.step import Trainer

pytestmark = pytest.mark.integration  # torch.compile takes minutes on 2 CPUs: not the fast tier


def pairs_of(n: int, seed: int) -> list[dict]:
    """Three pairs whose two sequences total about n tokens each, with reference log-probs away from the policy's."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, 500) for _ in range(max(1, k))]  # noqa: E731
    return [{"prompt_ids": ids(n // 4), "real_ids": ids(n // 4 + i), "generated_ids": ids(n // 2 - i),
             "ref_logp_real": -float(n), "ref_logp_generated": -0.5 * n} for i in range(3)]


def trainer(tiny_model: str, compiled: bool) -> Trainer:
    torch.manual_seed(0)
    t = Trainer(tiny_model, TrainConfig(optimizer="adamw", lr=1e-3, beta=0.1, compile=compiled), total_steps=8)
    t.setup()
    return t


def test_compiled_blocks_have_no_graph_breaks_compile_at_most_twice_and_equal_eager(tiny_model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = trainer(tiny_model, False), trainer(tiny_model, True)
    for step, n in enumerate([40, 97, 13, 160, 71]):  # five micro-batch lengths, none seen before
        micro_batches = [pairs_of(n, step), pairs_of(n // 2 + 5, step + 10)]
        a, b = eager.train_step(micro_batches), compiled.train_step(micro_batches)
        for key in ("loss", "grad_norm", "rewards/margins", "logps/real"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
