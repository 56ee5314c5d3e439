"""spin_ray.training.memory and spin_ray.tools.plan: `spin-ray plan`'s memory and time arithmetic on stated clusters,
and its CLI.

No Ray, no weights. Expected numbers are derived by hand in the comments.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.stages.resources import resolve
from spin_ray.tools import plan as sizing
from spin_ray.tools.plan import _dur, make_plan, pair_tokens, parse_cluster
from spin_ray.training.memory import ARCH_DIR, AUTO_FILL, GB, Arch, fit_memory, load_arch, train_memory


def cfg(*overrides: str) -> SpinConfig:
    return SpinConfig.load(None, ["model=tiny", "data.max_length=64", "data.max_prompt_length=32",
                                  "generate.max_tokens=16", *overrides])


def test_parameter_counts_match_the_models():
    # tiny: embed + untied head 2 x 512 x 64 = 65536; per layer q,o 2 x 64 x 64 + k,v 2 x 64 x 64 + MLP 3 x 64 x 128
    # + norms 2 x 64 = 41088, x 2 layers = 82176; final norm 64 → 147776 (what LlamaForCausalLM reports).
    assert load_arch("tiny").params == 147776
    # Mistral-7B: 2 x 32000 x 4096 + 32 x (2 x 4096² + 2 x 4096 x 1024 + 3 x 4096 x 14336 + 8192) + 4096.
    assert load_arch("alignment-handbook/zephyr-7b-sft-full").params == 7_241_732_096
    assert load_arch("smollm2-135m").params == 134_515_008  # tied: one 49152 x 576 matrix


def test_train_memory_by_hand():
    c = cfg("train.strategy=fsdp", "train.num_workers=2", "train.micro_batch_size=1", "train.global_batch_size=2",
            "data.max_length=16", "data.max_prompt_length=8", "generate.max_tokens=4", "train.use_gpu=true")
    m = train_memory(load_arch("tiny"), c)
    p = 147776
    assert m["parameters (fp32)"] == 4 * p / 2 == 295552
    assert m["gradients (fp32)"] == 295552  # fsdp: sharded, no DDP buckets
    assert m["optimizer (rmsprop, fp32)"] == 295552  # one state
    assert m["optimizer step (foreach)"] == 295552  # the step's sqrt of the second moment, per local shard
    assert m["weights in use"] == 2 * 2 * 41088  # two bf16 layers gathered
    # 2 sequences x 16 tokens = 32 tokens; per token per layer 16·64 + 4·64 + 8·128 = 2304 B; 2 layers, no checkpointing
    assert m["activations"] == 2 * 32 * 2304 == 147456
    assert m["logits"] == 10 * 32 * 512 == 163840
    assert m["runtime overhead"] == 2 * GB

    ddp = train_memory(load_arch("tiny"), dataclasses.replace(c, train=dataclasses.replace(
        c.train, strategy="ddp", optimizer="adamw", activation_checkpointing="full")))
    assert ddp["parameters (fp32)"] == 4 * p
    assert ddp["gradients (fp32)"] == 4 * p  # bf16 ddp is FSDP2 on a replicate-only mesh: no bucket copy
    assert ddp["optimizer (adamw, fp32)"] == 8 * p
    assert ddp["weights in use"] == 2 * 2 * 41088  # two bf16 layers gathered, not a bf16 copy of every weight
    # checkpointing: each layer's bf16 input (2 x 32 x 64 x 2 B) + one layer recomputed (32 x 2304 B)
    assert ddp["activations"] == 2 * 32 * 64 * 2 + 32 * 2304

    # CPU, one worker: fp32 activations (twice the bytes) and logits (8 B: no bf16 copy), no DDP wrapper, no autocast
    cpu = train_memory(load_arch("tiny"), dataclasses.replace(c, train=dataclasses.replace(
        c.train, strategy="ddp", num_workers=1, use_gpu=False)))
    assert cpu["gradients (fp32)"] == 4 * p and cpu["weights in use"] == 0 and cpu["runtime overhead"] == 0
    assert cpu["activations"] == 2 * 32 * 4608 and cpu["logits"] == 8 * 32 * 512
    # fp32 DDP with two workers: DDP's fp32 gradient buckets beside the gradients
    cpu2 = train_memory(load_arch("tiny"), dataclasses.replace(c, train=dataclasses.replace(
        c.train, strategy="ddp", use_gpu=False)))
    assert cpu2["gradients (fp32)"] == 8 * p and cpu2["weights in use"] == 0
    # bf16 on CPU (train.dtype) is computed like bf16 on GPU
    bf16 = train_memory(load_arch("tiny"), dataclasses.replace(c, train=dataclasses.replace(
        c.train, use_gpu=False, dtype="bfloat16")))
    assert bf16["weights in use"] == 2 * 2 * 41088 and bf16["logits"] == 10 * 32 * 512


# 8 layers of tiny's shape (hidden 64 = 4 heads x 16, kv 64, MLP 128, vocab 512, untied): layer 41088 weights,
# 2 x 512 x 64 + 8 x 41088 + 64 = 394304 parameters.
EIGHT = Arch("eight", hidden=64, intermediate=128, layers=8, heads=4, kv_heads=4, head_dim=16, vocab=512, tied=False)
# bf16 ddp, one worker, RMSprop: parameters, gradients, one state and the step's buffer (16 B per parameter), two
# gathered bf16 layers (4 B x 41088) and 2 GB of runtime overhead, whatever the forward.
FIXED = 16 * 394304 + 4 * 41088 + 2e9
# Per token in bf16 (B): logits 10 x 512 = 5120 (below CHUNK_TOKENS = 1024 tokens); activations per layer
# 16·64 + 4·64 + 8·128 = 2304 kept whole (none: 8 x 2304), or the layer input and its matmul and attention outputs,
# 2 x (5·64 + 2·64 + 2·128) = 1408, plus one layer's recompute (selective: 8 x 1408 + 2304), or the input alone
# (full: 8 x 2 x 64 + 2304).
NONE, SELECTIVE, FULL = 8 * 2304 + 5120, 8 * 1408 + 2304 + 5120, 8 * 128 + 2304 + 5120  # 23552, 18688, 8448


@pytest.mark.parametrize("filled, chosen", [
    (FIXED + NONE * 300, ("none", 300)),             # no recompute, 300 tokens fit
    (FIXED + NONE * 127, ("full", 354)),             # none needs 23552 x 128 at the smallest budget (2 x 64): full,
                                                     # 127 x 23552 / 8448 = 354.06 tokens
    (FIXED + FULL * 200, ("full", 200)),             # none does not fit: full, 200 tokens
    (FIXED + FULL * 100, ("full", 128)),             # nothing fits: full at the smallest budget (plan: does NOT fit)
    (80 * GB, ("none", 8192)),                       # a worker's whole share: 64 pairs x 2 x 64 tokens
])
def test_auto_memory_settings_by_hand(filled, chosen):
    # `auto` fills AUTO_FILL of the device: a device of filled / AUTO_FILL bytes (+1 for the division's rounding)
    c = resolve(cfg("train.use_gpu=true", "train.num_workers=1", "train.micro_batch_tokens=auto",
                    "train.activation_checkpointing=auto"), {"CPU": 8.0, "GPU": 1.0})
    t = fit_memory(c, EIGHT, filled / AUTO_FILL + 1).train
    assert (t.activation_checkpointing, t.micro_batch_tokens) == chosen


def test_auto_memory_settings_keep_what_is_stated():
    c = resolve(cfg("train.use_gpu=true", "train.num_workers=1"), {"CPU": 8.0, "GPU": 1.0})

    def fit(filled, **train):  # a device whose AUTO_FILL share is `filled` bytes
        device = None if filled is None else filled / AUTO_FILL + 1
        t = fit_memory(dataclasses.replace(c, train=dataclasses.replace(c.train, **train)), EIGHT, device).train
        return t.activation_checkpointing, t.micro_batch_tokens

    # a stated policy takes the largest budget under it, even where none would fit (it recomputes as asked)
    assert fit(FIXED + NONE * 300, activation_checkpointing="full", micro_batch_tokens="auto") == ("full", 836)
    # a stated budget (or micro_batch_size pairs, None) takes the fastest policy it fits under: 150 tokens need
    # 150 x 23552 without recompute; 8 pairs x 2 x 64 = 1024 tokens fit without it in 80 GB
    assert fit(FIXED + SELECTIVE * 150, activation_checkpointing="auto", micro_batch_tokens=150) == ("full", 150)
    assert fit(FIXED + NONE * 150, activation_checkpointing="auto", micro_batch_tokens=150) == ("none", 150)
    assert fit(80 * GB, activation_checkpointing="auto", micro_batch_tokens=None) == ("none", None)
    # on CPU (no device memory): no recompute and micro_batch_size (8) pairs at data.max_length, fixed
    assert fit(None, activation_checkpointing="auto", micro_batch_tokens="auto") == ("none", 8 * 2 * 64)
    assert fit(FIXED, activation_checkpointing="none", micro_batch_tokens=300) == ("none", 300)  # nothing auto


def test_plan_prints_what_auto_chose():
    c = SpinConfig.load(PAPER)  # auto recompute and token budget
    text = "\n".join(make_plan(c, parse_cluster("1x8xH100"), load_arch(c.model)).lines)
    # fits without recompute on an 80 GB H100: it does not recompute
    assert "train.activation_checkpointing auto = none, train.micro_batch_tokens auto = " in text
    assert "activation checkpointing none):" in text and "3 forwards (forward + backward (2 forwards))" in text
    small = make_plan(c, parse_cluster("1x8xA10G"), load_arch(c.model))  # 24 GB: full recompute
    assert any(line.startswith("  train.activation_checkpointing auto = full") for line in small.lines)
    cpu = make_plan(SpinConfig.load(None, ["model=tiny", "train.activation_checkpointing=auto",
                                           "train.micro_batch_tokens=auto"]), parse_cluster("1x0xCPU"),
                    load_arch("tiny"), prompts=64)
    assert ("train.activation_checkpointing auto = none, train.micro_batch_tokens auto = 16384: fixed on CPU, not "
            "sized from host RAM") in "\n".join(cpu.lines)


def test_seven_b_adamw_on_one_h200_does_not_fit_as_measured():
    """Measured (benchmarks/results/gpu): zephyr-7b, AdamW, one H200 (139.8 GiB) ran out of memory in the optimizer
    step at 144.9 GB. Without the step's foreach buffer the plan said 131 GB, fits."""
    c = SpinConfig.load("jobs/configs/paper_zephyr7b.yaml", [
        "train.num_workers=1", "generate.num_actors=1", "train.optimizer=adamw"])
    plan = make_plan(c, parse_cluster("1x1xH200"), load_arch(c.model))
    assert any("training" in p and "GB" in p for p in plan.problems), plan.problems


def test_seven_b_full_fine_tuning_does_not_fit_one_a10g():
    c = SpinConfig.load("jobs/configs/paper_zephyr7b.yaml", [
        "train.num_workers=1", "generate.num_actors=1", "train.global_batch_size=64"])
    plan = make_plan(c, parse_cluster("1x1xA10G"), load_arch(c.model))
    assert not plan.fits
    # 7.24 B fp32 parameters alone are 29 GB: training exceeds 24 GB, and the refusal names LoRA as a way out
    assert any(p.startswith("training needs") and "24.0 GB" in p and "train.lora" in p for p in plan.problems), \
        plan.problems
    assert plan.gpus_by_phase == {"pairs": 1.0, "train": 1.0}


def test_lora_train_memory_by_hand():
    c = cfg("train.strategy=fsdp", "train.num_workers=2", "train.micro_batch_size=1", "train.global_batch_size=2",
            "data.max_length=16", "data.max_prompt_length=8", "generate.max_tokens=4", "train.use_gpu=true",
            "train.lora.r=4", "train.lora.dropout=0.1", "train.lora.target_modules=[q_proj, v_proj, down_proj]")
    m = train_memory(load_arch("tiny"), c)
    # 4 x (in + out) per adapter: q (64 + 64), v (64 + 64), down (128 + 64); 2 layers → 3584 trained weights
    trained = 2 * 4 * ((64 + 64) + (64 + 64) + (128 + 64))
    assert load_arch("tiny").lora_params(4, ["q_proj", "v_proj", "down_proj"]) == trained == 3584
    assert m["frozen base (bfloat16)"] == 2 * 147776 / 2  # every θ_t weight in bf16, sharded over 2
    assert m["adapters (fp32)"] == m["gradients (fp32)"] == m["optimizer step (foreach)"] == 4 * trained / 2
    assert m["optimizer (rmsprop, fp32)"] == 4 * trained / 2 and "parameters (fp32)" not in m
    # per token per layer: 2304 B as full fine-tuning, plus each adapter's A output (4 values) and, under dropout,
    # its dropped input (64, 64, 128 values), in bf16: 2 x (68 + 68 + 132) = 536 B; 2 layers x 32 tokens
    assert m["activations"] == 2 * 32 * (2304 + 536)
    with pytest.raises(ConfigError, match="train.lora.target_modules: spin-ray plan knows .* not qkv"):
        train_memory(load_arch("tiny"), cfg("train.lora.target_modules=[qkv]"))


def test_seven_b_lora_runs_on_one_a10g():
    """zephyr-7b with LoRA: the frozen bf16 base (14.5 GB) and a forward under full recompute fit one 24 GB GPU, and
    generation (one engine) and training take turns on it, so one A10G runs the whole iteration."""
    c = SpinConfig.load("jobs/configs/paper_zephyr7b.yaml", [
        "train.num_workers=1", "generate.num_actors=1", "train.micro_batch_size=1", "train.lora.r=16"])
    one = make_plan(c, parse_cluster("1x1xA10G"), load_arch(c.model))
    sized = fit_memory(resolve(c, parse_cluster("1x1xA10G").total), load_arch(c.model), 24 * GB)
    train = train_memory(load_arch(c.model), sized)
    assert train["frozen base (bfloat16)"] == 2 * 7_241_732_096 and sum(train.values()) <= 24 * GB
    assert sized.train.activation_checkpointing == "full" and sized.train.micro_batch_tokens > 2 * 1024
    assert one.fits, one.problems
    assert any(line.startswith("  KV cache holds") for line in one.lines)  # the engine has room for sequences


PAPER = "jobs/configs/paper_zephyr7b.yaml"


@pytest.mark.parametrize("cluster", ["1x8xH100", "1x8xA100-80GB"])
def test_paper_recipe_fits_one_eight_gpu_node_as_shipped(cluster):
    """Generation, then training (its first pass the reference log-probs): the phases take turns on all 8 GPUs."""
    c = SpinConfig.load(PAPER)
    plan = make_plan(c, parse_cluster(cluster), load_arch(c.model))
    assert plan.fits, plan.problems
    assert plan.gpus_by_phase == {"pairs": 8.0, "train": 8.0}
    text = "\n".join(plan.lines)
    assert "pairs   generate " in text and "train   train " in text and "score" not in text
    assert "train.num_workers auto = 8: every GPU, 8 pair(s) each" in text and "HSDP" not in text
    assert "  goal      1.5 h per iteration" in text
    # vLLM's max_num_seqs: 1024 on H100, bound here by the KV cache (977); 256 on A100s. The preset's 2 calls of 1024
    # prompts in flight do not bind it, so the plan has no batch-size advice.
    assert f"vLLM: bf16 weights, {977 if cluster == '1x8xH100' else 256} sequences" in text
    assert "keeps at most" not in text


def test_a_small_engine_call_binds_generation():
    """generate.batch_size x batches_in_flight caps the sequences an engine decodes at once: 2 x 128 = 256 of the 977
    the H100's KV cache holds; the plan says so and what keeps it full, and its decode term counts 256 sequences per
    step. 4 calls of 128 in flight hold 512."""
    c = SpinConfig.load(PAPER)
    small = dataclasses.replace(c, generate=dataclasses.replace(c.generate, batch_size=128, batches_in_flight=2))
    deeper = dataclasses.replace(c, generate=dataclasses.replace(c.generate, batch_size=128, batches_in_flight=4))
    arch, cluster = load_arch(c.model), parse_cluster("1x8xH100")
    shipped, capped = make_plan(c, cluster, arch), make_plan(small, cluster, arch)
    text = "\n".join(capped.lines)
    assert ("generate.batch_size 128 x batches_in_flight 2 keeps at most 256 sequences decoding per engine where vLLM "
            "would run 977" in text and "a generate.batch_size of 1024 keeps it full" in text)

    def generate_line(plan):
        return next(line for line in plan.lines if line.startswith("  generate ") and "new tokens" in line)
    assert generate_line(capped).endswith("at 256 sequences/step)")
    assert generate_line(make_plan(deeper, cluster, arch)).endswith("at 512 sequences/step)")
    assert generate_line(shipped).endswith("at 977 sequences/step)")


def fake_measurements(tmp_path, monkeypatch, *entries: dict) -> None:
    """spin-ray plan reads `entries` instead of the shipped measured_steps.json."""
    base = dict(date="2030-01-02", model="Fake-1B", attention="fake attention", compile=False, source="fake.json",
                figure="summary")
    path = tmp_path / "measured_steps.json"
    path.write_text(json.dumps({"measurements": [{**base, **e} for e in entries]}))
    monkeypatch.setattr(sizing, "MEASURED_STEPS", path)


def test_paper_iteration_time_follows_the_measured_step(tmp_path, monkeypatch):
    """1x8xH100: 49,792 prompts x window 2 = 99,584 pairs of 2 x 150 + 300 + 257 = 857 tokens (the stated UltraChat
    figures; answers run to 256 new tokens + EOS); 14.33 GFLOP per token per forward; 4 forwards under full
    checkpointing; 2 epochs; 8 x 989 TFLOP/s at the measured step's share of peak: 15% MFU measured with full
    recompute counts 3 forwards, so 15% x 4/3 = 20% of the computed FLOPs."""
    fake_measurements(tmp_path, monkeypatch, dict(device="H100", activation_checkpointing="full", mfu=0.15),
                      dict(device="H100", activation_checkpointing="none", mfu=0.30))
    c = SpinConfig.load(PAPER, ["train.activation_checkpointing=full"])
    arch = load_arch(c.model)
    plan = make_plan(c, parse_cluster("1x8xH100"), arch)
    tokens = 99_584 * 857
    flops = arch.forward_flops_per_token(857 / 2)
    rate = 8 * 989e12 * 0.20
    train, reference = tokens * 2 * 4 * flops / rate, tokens * flops / rate  # 1.7 h and 12.9 min
    generate = next(float(line.split()[1]) for line in plan.lines if line.startswith("  generate ")
                    and line.endswith("sequences/step)"))  # "92.5 s": the engines' share, bandwidth and prefill
    assert plan.seconds_per_iteration == pytest.approx(train + reference + generate + 90 + 180, abs=0.1)
    # the goal is missed, and the plan says which term, from which measurement, and what MFU would meet it:
    # 1.5 h - 270 s fixed - 92.5 s generation leaves 5037.5 s for 6957 s (train + reference) at 20%: 27.6%
    goal = next(line for line in plan.lines if line.startswith("  goal "))
    assert "NOT met" in goal and "20% MFU, measured on this device (2030-01-02, fake attention)" in goal
    assert "the goal needs 28% MFU" in goal
    assumptions = next(line for line in plan.lines if line.startswith("assumptions: "))
    assert ("at 20% of peak in computed FLOPs, from the step measured on H100 SXM 80GB on 2030-01-02 (Fake-1B, fake "
            "attention, activation checkpointing full: 15.0% MFU; fake.json), as measured on this device"
            ) in assumptions
    # without recompute the plan takes the none measurement: 3 forwards at 30%
    none = make_plan(SpinConfig.load(PAPER, ["train.activation_checkpointing=none"]), parse_cluster("1x8xH100"), arch)
    assert none.seconds_per_iteration == pytest.approx(
        tokens * (2 * 3 + 1) * flops / (8 * 989e12 * 0.30) + generate + 90 + 180, abs=0.1)


def test_an_unmeasured_device_says_so_and_extrapolates_by_peak(tmp_path, monkeypatch):
    """No A100 measurement: the measured device nearest in peak FLOPs (H100 and H200 both 989 TFLOP/s: the newer
    measurement) lends its share of peak, applied to the A100's 312 TFLOP/s, and the plan says so."""
    fake_measurements(tmp_path, monkeypatch, dict(device="H100", activation_checkpointing="none", mfu=0.30),
                      dict(device="H200", activation_checkpointing="none", mfu=0.20, date="2029-01-01"))
    eff = sizing.train_efficiency(parse_cluster("1x8xA100-80GB").device, "none", False)
    assert eff.extrapolated and eff.measurement.device == "H100" and eff.utilisation == 0.30
    assert eff.note == ("no measurement on A100 SXM 80GB: H100 SXM 80GB's share of peak applied to 312 TFLOP/s "
                        "(scaled by peak FLOPs), an extrapolation")
    own = sizing.train_efficiency(parse_cluster("1x8xH200").device, "full", False)
    # the H200's own measurement, without recompute, carried over per computed FLOP: 20% x 3/3
    assert not own.extrapolated and own.utilisation == pytest.approx(0.20) and "full not measured there" in own.note
    c = SpinConfig.load(PAPER, ["train.activation_checkpointing=none"])
    plan = make_plan(c, parse_cluster("1x8xA100-80GB"), load_arch(c.model))
    text = "\n".join(plan.lines)
    assert "no measurement on A100 SXM 80GB" in text and "an extrapolation" in text
    assert "extrapolated from H100 SXM 80GB (2030-01-02, fake attention)" in text


def test_shipped_measurements_are_the_benchmark_files_figures():
    """Every shipped figure is in the results file it names, for a device the plan knows."""
    for m in sizing.load_measurements():
        text = open(m.source).read()
        assert m.device in sizing.DEVICES and m.source.startswith("benchmarks/results/gpu/")
        assert repr(m.mfu) in text or f"MFU {m.mfu:.1%}" in text, m


def test_paper_recipe_trains_on_every_gpu_of_four_nodes():
    c = SpinConfig.load(PAPER)
    one = make_plan(c, parse_cluster("1x8xH100"), load_arch(c.model))
    four = make_plan(c, parse_cluster("4x8xH100"), load_arch(c.model))
    assert four.fits, four.problems
    assert four.gpus_by_phase == {"pairs": 32.0, "train": 32.0}  # an engine per GPU, then a Train worker per GPU
    text = "\n".join(four.lines)
    assert "32 x Train workers" in text and "HSDP: shards of 8" in text
    # 64 pairs per step on 32 GPUs: the plan says so with the figures, and what it kept
    assert "64 pairs per step = 2 per GPU, below train.micro_batch_size 8" in text and "kept" in text
    # the token budget is the worker's whole share, 2 pairs x 2 sequences x 1024 tokens, and fits without recompute
    assert "micro-batch 4096 tokens, activation checkpointing none" in text
    assert "train.activation_checkpointing auto = none, train.micro_batch_tokens auto = 4096" in text
    params = next(line for line in four.lines if line.startswith("  parameters (fp32)"))
    assert params.split()[-2] == f"{4 * 7_241_732_096 / 8 / 1e9:.1f}"  # HSDP: sharded over a node's 8, not all 32
    assert four.seconds_per_iteration < one.seconds_per_iteration / 3  # 4x the GPUs for every phase
    assert "goal      1.5 h per iteration (--goal-hours): met" in text


def test_pair_tokens_from_a_sample_the_flags_and_bounds():
    # bundled data through tasks-sft's (character-level) tokenizer and chat template: short sampled rows
    c = SpinConfig.load("jobs/configs/cpu_default.yaml")
    sampled = pair_tokens(c)
    assert sampled.source.startswith("a sample of 512 rows of bundled")
    assert 0 < sampled.prompt <= c.data.max_prompt_length and 0 < sampled.real
    assert sampled.prompt + max(sampled.real, sampled.generated) <= c.data.max_length
    # flags: the prompt keeps its last 512 tokens, each answer the 1024 - 512 left
    p = SpinConfig.load(PAPER)
    flags = pair_tokens(p, prompt_tokens=600, answer_tokens=2000)
    assert (flags.prompt, flags.real, flags.generated, flags.pair) == (512, 512, 257, 2 * 512 + 512 + 257)
    assert pair_tokens(p).source.startswith("stated figures for UCLA-AGI/SPIN_iter0")
    unknown = pair_tokens(SpinConfig.load(PAPER, ["data.path=some/hub-data"]))
    assert (unknown.prompt, unknown.real, unknown.generated) == (512, 512, 257) and unknown.source.startswith("bounds")


def test_parse_cluster():
    spec = parse_cluster("4x8xA100-80GB")
    assert spec.total == {"CPU": 4 * 96.0, "GPU": 32.0} and spec.device.memory_gb == 80
    assert parse_cluster("1x0xCPU", cpus_per_node=2).total == {"CPU": 2.0, "GPU": 0.0}
    for bad in ["8xH100", "1x8xV99", "1x2xCPU", "0x8xH100"]:
        with pytest.raises(ConfigError, match="--cluster"):
            parse_cluster(bad)


def test_arch_from_a_local_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, '
                                          '"num_attention_heads": 2, "vocab_size": 10, "tie_word_embeddings": true}')
    a = load_arch("some/unknown-model", str(tmp_path))
    # embed 10 x 8 = 80; layer 2·8·8 + 2·8·8 + 3·8·16 + 2·8 = 656; final norm 8 → 744
    assert (a.kv_heads, a.head_dim, a.params) == (2, 4, 744)
    with pytest.raises(ConfigError, match="--model-config"):
        load_arch("some/unknown-model")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "local"}
    return subprocess.run([sys.executable, "-m", "spin_ray.cli", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.integration  # the real CLI in subprocesses: not the fast tier
def test_plan_cli_exit_codes():
    ok = run_cli("--config", "jobs/configs/paper_zephyr7b.yaml", "--cluster", "1x8xH100")
    assert ok.returncode == 0, ok.stderr
    assert "memory per training GPU" in ok.stdout and "time per iteration" in ok.stdout and "assumptions:" in ok.stdout
    assert "{" not in ok.stdout  # the plan is for people; --json is for scripts
    scripted = run_cli("--config", "jobs/configs/paper_zephyr7b.yaml", "--cluster", "1x8xH100", "--json")
    out = json.loads(scripted.stdout)  # the object alone on stdout; the plan's lines went to stderr
    assert scripted.stderr.strip() == ok.stdout.strip()
    assert out["fits"] is True and out["problems"] == [] and out["gpus_by_phase"] == {"pairs": 8, "train": 8}
    iteration = next(line for line in ok.stdout.splitlines() if line.startswith("  iteration "))
    assert f"iteration {_dur(out['seconds_per_iteration'])};" in iteration
    tight = run_cli("--config", "jobs/configs/paper_zephyr7b.yaml", "--cluster", "1x1xA10G",
                    "--set", "train.num_workers=1", "--set", "generate.num_actors=1")
    assert tight.returncode == 1 and "does NOT fit" in tight.stdout and "training needs" in tight.stdout
    bad = run_cli("--cluster", "1x8xV99")
    assert bad.returncode == 2 and "--cluster" in bad.stderr


def test_a_cpu_train_worker_takes_the_fixed_choice(tmp_path):
    """The Train worker's side of the rule (train.fit_device_memory): a CPU device has no memory to size from, so no
    recompute and micro_batch_size (8) pairs at data.max_length (64) = 1024 tokens; a Trainer refuses an unchosen
    `auto` rather than reading it as some policy."""
    from spin_ray.stages.train import fit_device_memory
    from spin_ray.training.step import Trainer

    (tmp_path / "config.json").write_text((ARCH_DIR / "tiny-llama.json").read_text())
    c = resolve(cfg("train.activation_checkpointing=auto", "train.micro_batch_tokens=auto"), {"CPU": 4.0})
    t = fit_device_memory(c, str(tmp_path), torch.device("cpu"), rank=0, world=1).train
    assert (t.activation_checkpointing, t.micro_batch_tokens) == ("none", 1024)
    with pytest.raises(ValueError, match="chosen from the device's memory"):
        Trainer(str(tmp_path), c.train, total_steps=1)
