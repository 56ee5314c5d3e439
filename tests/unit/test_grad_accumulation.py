"""Gradient accumulation under FSDP2 (spin_ray.training.step.grad_sync): every micro-batch lands in the sharded gradients.

One gloo process (world 1), the trainer's own build_sharded; the 2- and 4-worker invariance test (tests/integration/
test_train.py) checks that the accumulated step equals the unsplit one across workers, FSDP2 and HSDP.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from baselines import pack_pairs, packed_logps  # noqa: E402

from spin_ray.config import TrainConfig  # noqa: E402
from spin_ray.training.step import build_sharded, grad_sync  # noqa: E402


@pytest.fixture
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if dist.is_initialized():  # left by an earlier in-process test: this one needs its own world of 1
        dist.destroy_process_group()
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_reduces_each_micro_batch_into_the_sharded_gradients(group, tiny_model):
    torch.manual_seed(0)
    model = build_sharded(tiny_model, TrainConfig(strategy="fsdp"), "float32", 0, 1, torch.device("cpu"),
                           load_weights=True)
    params = [p for p in model.parameters() if p.requires_grad]
    pairs = [{"prompt_ids": [5, 6, 7], "real_ids": [8, 9, 2], "generated_ids": [10, 2]},
             {"prompt_ids": [5, 11], "real_ids": [12, 13, 14, 2], "generated_ids": [15, 16, 2]}]

    def backward(idx: list[int], last: bool) -> None:
        with grad_sync(model, last):
            real, generated = packed_logps(model, pack_pairs([pairs[i] for i in idx], 0))
            (real - generated).sum().backward()

    backward([0], last=False)
    # The non-last micro-batch's gradient is already reduced into p.grad (the shard). Before, FSDP2 held it aside as
    # an unsharded fp32 copy of every parameter until the last micro-batch, and p.grad stayed None.
    assert all(p.grad is not None for p in params)
    first = [p.grad.to_local().clone() for p in params]
    backward([1], last=True)
    only_second = [p.grad.to_local() - g for p, g in zip(params, first)]
    model.zero_grad(set_to_none=True)
    backward([1], last=True)
    for acc, alone in zip(only_second, (p.grad.to_local() for p in params)):
        torch.testing.assert_close(acc, alone, rtol=1e-5, atol=1e-6)
