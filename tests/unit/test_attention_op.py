"""The varlen attention ops at the op, as kernel libraries test theirs (benchmarks/attention_check.py): output and
dq, dk, dv against a wider-float reference, bounded by a naive implementation's error in the kernel's dtype, with
negative controls that must miss by 10x. On CPU the per-sequence path (and the custom op that torch.compile traces)
in fp32 on short cases; on CUDA the fused kernel too, in bf16 on sequences up to 2k tokens."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from attention_check import CONTROL_MARGIN, CPU_CASES, DTYPE, GPU_CASES, check, kernels  # noqa: E402

CUDA = torch.cuda.is_available()


def cases(kernel: str) -> list:
    cpu = [pytest.param("cpu", kernel, *c, id=f"cpu-{kernel}-{c}") for c in CPU_CASES if kernel != "fused"]
    gpu = [pytest.param("cuda", kernel, *c, id=f"cuda-{kernel}-{c}",
                        marks=pytest.mark.skipif(not CUDA, reason="CUDA cases run where a GPU is")) for c in GPU_CASES]
    return cpu + gpu


@pytest.mark.parametrize("device, kernel, lengths, ratio, seed",
                         cases("per_sequence") + cases("per_sequence_op") + cases("fused"))
def test_kernel_is_within_its_bound_over_naive_and_every_negative_control_misses_by_10x(device, kernel, lengths, ratio,
                                                                                     seed):
    result = check(kernels(torch.device(device))[kernel], lengths, ratio, seed, torch.device(device), DTYPE[device])
    assert result["passed"], result
    assert set(result["controls_over_bound"]) >= {"not_causal", "cu_seqlens_off_by_one"} | (
        {"kv_head_i_mod_hkv"} if ratio > 1 else set())
    assert min(result["controls_over_bound"].values()) >= CONTROL_MARGIN, result


@pytest.mark.skipif(not CUDA, reason="the fused kernel runs on CUDA only")
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_a_varlen_model_on_cuda_runs_the_fused_kernel_for_plain_and_grouped_heads(kv_heads, caplog):
    """The model-level wiring: VARLEN calls torch's varlen op in bf16 whatever the head grouping, and says nothing
    about a fallback."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spin_ray.training.template import pack_varlen, varlen_logps

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, head_dim=64, vocab_size=1024)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
    pairs = [{"prompt_ids": [5] * p, "real_ids": [6] * r, "generated_ids": [7] * g}
             for p, r, g in [(37, 200, 150), (1, 2, 1), (300, 64, 640)]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        varlen_logps(model, pack_varlen(pairs).to(torch.device("cuda")))
    assert any("varlen_attn" in e.key for e in prof.key_averages())
    assert "instead of the fused varlen kernel" not in caplog.text


def test_the_fused_path_names_why_it_cannot_serve_a_call():
    """The reasons a CUDA call falls back to per-sequence attention (logged once per model by varlen_attention)."""
    from spin_ray.training.template import _fused_unsupported

    q = torch.zeros(3, 4, 64, dtype=torch.float32)
    assert "float16 or bfloat16" in _fused_unsupported(q, q, 0.0)
    assert "dropout" in _fused_unsupported(q.bfloat16(), q.bfloat16(), 0.1)
    assert _fused_unsupported(q.bfloat16(), q[:, :2].bfloat16(), 0.0) is None
