"""One host sync per optimizer step: Trainer.train_step reads the device once, however many micro-batches it runs.

Counted on CPU by benchmarks/host_syncs.HostSyncs: the Python reads of a tensor's value and the aten ops that read
values inside C++ (boolean indexing, nonzero, masked_scatter, ...), each of which makes the host wait on CUDA."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from host_syncs import HostSyncs  # noqa: E402
from padding import long_tailed_pairs  # noqa: E402

from spin_ray.config import TrainConfig  # noqa: E402
from spin_ray.training.step import Trainer  # noqa: E402


def test_the_counter_sees_python_reads_and_reads_inside_aten_ops():
    x = torch.arange(6.0)
    with HostSyncs() as syncs:
        x.sum().item()
        x[x > 2].sum()  # boolean indexing: the count of True is read before the output exists
        x.tolist()
        x.index_select(0, torch.tensor([1, 2]))  # an index tensor: nothing to read
    assert syncs.total == 3, syncs.counts


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_a_step_of_five_micro_batches_reads_the_device_once(tiny_model, optimizer):
    torch.manual_seed(0)
    trainer = Trainer(tiny_model, TrainConfig(optimizer=optimizer, lr=1e-4, beta=0.5), total_steps=4)
    trainer.setup()
    pairs = long_tailed_pairs(15, trainer.model.config.vocab_size, 256, 128, seed=1)  # 1 to ~250 tokens each
    step = [pairs[i:i + 3] for i in range(0, 15, 3)]
    # Reference log-probs away from the policy's, so the loss is not at its fixed point.
    refs = [(r.double() - 1.0, g.double() + 2.0) for r, g in trainer.logps(step)]
    policy = trainer.logps(step)  # θ before the step: what the step's forward computes
    step = [[{**p, "ref_logp_real": float(r), "ref_logp_generated": float(g)} for p, r, g in zip(mb, *ref)]
            for mb, ref in zip(step, refs)]
    with HostSyncs() as syncs:
        metrics = trainer.train_step(step)
    assert syncs.total <= 1, syncs.counts
    # The metrics read in that one sync are the step's: the mean over pairs of −log σ(β · margin).
    margins = [0.5 * ((pr - rr) - (pg - rg)) for (pr_mb, pg_mb), (rr_mb, rg_mb) in zip(policy, refs)
               for pr, pg, rr, rg in zip(pr_mb.tolist(), pg_mb.tolist(), rr_mb.tolist(), rg_mb.tolist())]
    assert metrics["loss"] == pytest.approx(sum(math.log1p(math.exp(-z)) for z in margins) / 15, rel=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / 15, rel=1e-6, abs=1e-6)
    assert metrics["tokens"] == sum(2 * len(p["prompt_ids"]) + len(p["real_ids"]) + len(p["generated_ids"])
                                    for p in pairs)
    assert metrics["grad_norm"] > 0
