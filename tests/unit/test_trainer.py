"""spin_ray.training.step.Trainer in one process (world 1, no Ray): the step that the Ray Train workers and the benchmarks
call. The multi-worker invariance (1x4 = 2x2 = FSDP2 = HSDP) is tests/integration/test_train.py."""

from __future__ import annotations

import math
import os

import pytest
import torch

from spin_ray.config import TrainConfig
from spin_ray.training.step import Trainer, lr_factor

PAIRS = [{"prompt_ids": [5, 6, 7], "real_ids": [8, 9, 2], "generated_ids": [10, 2]},
         {"prompt_ids": [5, 11], "real_ids": [12, 13, 14, 2], "generated_ids": [15, 16, 2]},
         {"prompt_ids": [7, 7, 8, 9], "real_ids": [3, 2], "generated_ids": [4, 4, 4, 2]},
         {"prompt_ids": [6], "real_ids": [9, 9, 9, 9, 2], "generated_ids": [2]}]


def make(tiny_model: str, **train: object) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(tiny_model, TrainConfig(optimizer="adamw", lr=1e-3, beta=1.0, **train), total_steps=4)
    trainer.setup()
    return trainer


def with_refs(trainer: Trainer, micro_batches: list[list[dict]]) -> list[list[dict]]:
    """The pairs with reference log-probs from the trainer's own no-grad forward (the policy is the reference)."""
    out = []
    for pairs, (real, generated) in zip(micro_batches, trainer.logps(micro_batches)):
        out.append([{**p, "ref_logp_real": float(r), "ref_logp_generated": float(g)}
                    for p, r, g in zip(pairs, real, generated)])
    return out


def test_step_zero_is_ln2_against_the_trainers_own_logps(tiny_model):
    trainer = make(tiny_model)
    metrics = trainer.train_step(with_refs(trainer, [PAIRS[:2], PAIRS[2:]]))
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["grad_norm"] > 0 and metrics["tokens"] == sum(
        2 * len(p["prompt_ids"]) + len(p["real_ids"]) + len(p["generated_ids"]) for p in PAIRS)
    assert 0 <= metrics["padding_share"] < 1 and metrics["lr"] == pytest.approx(1e-3)


def test_sft_term_at_step_zero_adds_the_weighted_nll_per_token_of_the_human_answers(tiny_model):
    trainer = make(tiny_model, sft_weight=0.5)
    pairs = with_refs(trainer, [PAIRS])[0]
    nll = sum(-p["ref_logp_real"] / len(p["real_ids"]) for p in pairs) / len(pairs)  # the policy is the reference
    metrics = trainer.train_step([pairs[:2], pairs[2:]])
    assert metrics["nll/real_per_token"] == pytest.approx(nll, rel=1e-5)
    assert metrics["loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5)


def test_micro_batches_accumulate_to_the_unsplit_step(tiny_model):
    one, four = make(tiny_model), make(tiny_model)
    refs = [p for mb in with_refs(one, [PAIRS]) for p in mb]
    refs = [{**p, "ref_logp_real": p["ref_logp_real"] + 0.5} for p in refs]  # away from the loss's fixed point
    a = one.train_step([refs])
    b = four.train_step([[p] for p in refs])
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # AdamW's first step moves every weight by ±lr whatever its gradient's size, so a gradient within float noise of 0
    # may move its weight the other way: all but a few weights agree to 1e-6, none by more than 2 lr.
    far = [(x - y).abs() for x, y in zip(one.model.parameters(), four.model.parameters())]
    assert max(d.max().item() for d in far) <= 2.01e-3
    assert sum(int((d > 1e-6).sum()) for d in far) <= 1e-4 * sum(d.numel() for d in far)


def test_lr_schedule_warms_up_from_the_first_step_then_decays_to_zero_or_holds():
    """The one schedule of the trainer and of models.builders.sft: warmup 2 of 6 steps."""
    assert [lr_factor(s, 6, 2) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lr_factor(s, 6, 2, decay=False) for s in range(7)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 3, 0) for s in range(4)] == [1.0, 2 / 3, 1 / 3, 0.0]  # no warmup: the peak at step 0


@pytest.mark.parametrize("policy, compiled", [("full", False), ("selective", False), ("none", True)])
def test_recompute_policies_and_compile_give_the_same_gradients(tiny_model, policy, compiled):
    from spin_ray.training.template import pack_varlen, varlen_logps

    def gradients(trainer: Trainer) -> list[torch.Tensor]:
        real, generated = varlen_logps(trainer.model, pack_varlen(PAIRS))
        (real - 2 * generated).sum().backward()
        return [p.grad for p in trainer.model.parameters()]

    plain = make(tiny_model)
    other = make(tiny_model, activation_checkpointing=policy, compile=compiled)
    for a, b in zip(gradients(plain), gradients(other)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recompute_policy_is_validated():
    from spin_ray.config import ConfigError, SpinConfig

    with pytest.raises(ConfigError, match=r"train.activation_checkpointing = 'partial': must be one of 'none', "
                                          r"'full', 'selective'"):
        SpinConfig.load(None, ["train.activation_checkpointing=partial"])
    with pytest.raises(ConfigError, match="train.compile = 'sometimes': expected bool"):
        SpinConfig.load(None, ["train.compile=sometimes"])


def test_selective_recomputes_no_matmul_and_full_recomputes_every_layer(tiny_model):
    """FLOPs of one forward + backward (torch's FlopCounterMode counts matmuls and attention): selective keeps those
    outputs, so it runs no more of them than no checkpointing; full recomputes each layer's forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from spin_ray.training.template import pack_varlen, varlen_logps

    def flops(policy: str) -> int:
        trainer = make(tiny_model, activation_checkpointing=policy)
        with FlopCounterMode(display=False) as counter:
            real, generated = varlen_logps(trainer.model, pack_varlen(PAIRS))
            (real - generated).sum().backward()
        return counter.get_total_flops()

    none, selective, full = flops("none"), flops("selective"), flops("full")
    assert selective == none < full


def lora_trainer(tiny_model: str, train: dict | None = None, **lora: object) -> Trainer:
    from spin_ray.config import LoraConfig

    return make(tiny_model, **train or {}, lora=LoraConfig(**{
        "r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora}))


def test_lora_starts_at_theta_t_and_trains_only_the_adapters(tiny_model):
    trainer = lora_trainer(tiny_model, dropout=0.1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adapters = {k for k in before if ".lora_" in k}
    # r·(in + out) per adapted layer: q and v (64 → 64), down (128 → 64), in each of 2 layers
    assert sum(p.numel() for p in trainer.params) == 2 * 4 * ((64 + 64) + (64 + 64) + (128 + 64))
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == adapters
    # B = 0: the policy is θ_t exactly (even under dropout), so step 0 is ln 2 against θ_t's own log-probs.
    full = make(tiny_model)
    metrics = trainer.train_step(with_refs(full, [PAIRS[:2], PAIRS[2:]]))
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics["grad_norm"] > 0
    for _ in range(2):
        trainer.train_step(with_refs(full, [PAIRS]))
    after = trainer.model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == adapters


def test_lora_export_is_theta_t_plus_the_scaled_adapters_with_no_adapter_files(tiny_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_ray.training.checkpoint import export_hf

    trainer = lora_trainer(tiny_model)
    for _ in range(2):
        trainer.train_step(with_refs(make(tiny_model), [PAIRS]))
    export_hf(trainer.model, AutoTokenizer.from_pretrained(tiny_model), torch.float32, 0, str(tmp_path / "m"), {},
              lora_base=tiny_model)
    assert not [f for f in os.listdir(tmp_path / "m") if "adapter" in f]
    saved = load_file(tmp_path / "m" / "model.safetensors")
    assert not [k for k in saved if "lora" in k or "base_layer" in k]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    theta_t = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    state = trainer.model.state_dict()
    for key, w in theta_t.items():
        name = key.removesuffix(".weight")
        if f"{name}.lora_A.default.weight" in state:
            a, b = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
            assert b.abs().max() > 0
            torch.testing.assert_close(merged[key], w + (8.0 / 4) * b @ a, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(merged[key], w), key
    # The merged model computes what the trained adapters do.
    from spin_ray.training.template import pack_varlen, varlen_logps

    trainer.model.eval()
    with torch.no_grad():
        got = varlen_logps(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), pack_varlen(PAIRS))
        want = varlen_logps(trainer.model, pack_varlen(PAIRS))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def test_lora_state_resumes_exactly(tiny_model, tmp_path):
    from spin_ray.training.checkpoint import STATE, load_state, save_state

    pairs = with_refs(make(tiny_model), [PAIRS])
    a = lora_trainer(tiny_model)
    a.train_step(pairs)
    save_state(a.model, a.optimizer, a.scheduler, 1, 0, str(tmp_path))
    b = lora_trainer(tiny_model)  # other random A: the checkpoint's must replace it
    assert load_state(str(tmp_path / STATE), b.model, b.optimizer, b.scheduler, 0) == 1
    a.train_step(pairs)
    b.train_step(pairs)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_lora_refuses_the_head_and_unknown_targets(tiny_model):
    from spin_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.lora.target_modules = \['lm_head'\] matches lm_head, which is not"):
        lora_trainer(tiny_model, target_modules=["lm_head"])
    with pytest.raises(ConfigError, match=r"train.lora.target_modules = \['qkv'\]: .*not found"):
        lora_trainer(tiny_model, target_modules=["qkv"])


@pytest.fixture
def world_of_one():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    if dist.is_initialized():  # left by an earlier in-process test
        dist.destroy_process_group()
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_bf16_lora_holds_a_bf16_base_and_resumes_exactly(world_of_one, tiny_model, tmp_path):
    """FSDP2 (meta init) in bf16: the frozen base is bf16 (no fp32 master copy), the adapters fp32; a resumed trainer
    built without θ_t's weights (load_weights off) takes the checkpoint's base and adapters and the same next step."""
    from spin_ray.training.checkpoint import STATE, load_state, save_state

    a = lora_trainer(tiny_model, {"strategy": "fsdp", "dtype": "bfloat16"})
    dtypes = {name: p.dtype for name, p in a.model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    pairs = with_refs(a, [PAIRS])  # θ_t in bf16: the reference pass, the trainer's own forward
    assert a.train_step(pairs)["loss"] == pytest.approx(math.log(2), abs=1e-6)
    save_state(a.model, a.optimizer, a.scheduler, 1, 0, str(tmp_path))
    torch.manual_seed(1)
    b = Trainer(tiny_model, a.tc, total_steps=4)
    b.setup(load_weights=False)
    assert load_state(str(tmp_path / STATE), b.model, b.optimizer, b.scheduler, 0) == 1
    a.train_step(pairs)
    b.train_step(pairs)
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x.to_local(), y.to_local())
