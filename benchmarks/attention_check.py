"""The varlen attention kernels tested as kernel libraries test theirs: at the op, on random inputs, against a
reference in fp32, with an error bound taken from a naive implementation in the kernel's own dtype.

For each case (sequence lengths, query heads per key/value head, seed): q, k, v ~ N(0, 1) in the device's training
dtype (bf16 on CUDA, fp32 on CPU), a random upstream gradient dO; the output and dq, dk, dv of
  reference   naive attention (explicit softmax of masked scores) one float wider (fp32 for bf16, fp64 for fp32),
              from the same rounded inputs
  naive       the same code in the kernel's dtype: what rounding alone costs
  kernel      the op under test (template.fused_attention on CUDA, template.per_sequence_attention and its custom
              op everywhere)
A kernel passes when each of its four max-abs errors is at most TOLERANCE x the naive one's, as flash-attention's
own tests bound theirs. (torch's CPU SDPA in bf16 does not: its backward sums dk and dv over a
key/value head's query heads in bf16, up to 4.6x naive bf16 at 8 query heads per key/value head, measured; CPU
training computes in fp32.) Negative controls, run through the same kernel with one thing wrong, must miss by at least
CONTROL_MARGIN x that bound: key/value head i % Hkv instead of i // (Hq / Hkv), a sequence boundary off by one, and
attention that is not causal; so a passing kernel is not one that any output would pass.

tests/unit/test_attention_op.py runs CPU_CASES (GPU_CASES too where CUDA is); benchmarks/gpu.py records `run`.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

TOLERANCE = {torch.bfloat16: 2.0, torch.float32: 4.0}
"""Error bound over the naive implementation's: flash-attention's own 2x in bf16; in fp32 both errors are a few float
epsilons (~1e-6), where the max over a tensor scatters more (torch's CPU SDPA reached 2.9x naive fp32 in dq)."""
CONTROL_MARGIN = 10.0
HEADS, HEAD_DIM = 16, 64  # 16: at 8 query heads per key/value head there are still 2 to confuse
RATIOS = (1, 2, 4, 8)
SEEDS = (0, 1, 2)
# Lengths include 1, non-multiples of 128 and several sequences per batch; CPU keeps them short (seconds in all).
CPU_LENGTHS = ((1, 7, 130), (65, 1, 200, 3))
GPU_LENGTHS = ((1, 7, 130, 2048), (1000, 1, 129, 511, 255), (2047, 1, 1))
CPU_CASES = list(itertools.product(CPU_LENGTHS, RATIOS, SEEDS[:2]))
GPU_CASES = list(itertools.product(GPU_LENGTHS, RATIOS, SEEDS))

REFERENCE = {torch.bfloat16: torch.float32, torch.float32: torch.float64}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
"""Each device's training dtype (train.dtype auto), the one its kernels are tested in."""

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int], float], torch.Tensor]


def kernels(device: torch.device) -> dict[str, Kernel]:
    """The ops under test on `device`: (q, k, v, bounds, scale) -> out, bounds the cumulative lengths (host ints)."""
    from spin_ray.training.template import fused_attention, per_sequence_attention

    def custom_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float) -> torch.Tensor:
        return torch.ops.spin_ray.per_sequence_attention(q, k, v, torch.tensor(bounds), scale)

    out = {"per_sequence": per_sequence_attention, "per_sequence_op": custom_op}
    if device.type == "cuda":
        def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float) -> torch.Tensor:
            cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
            return fused_attention(q, k, v, cu, max(b - a for a, b in zip(bounds, bounds[1:])), scale)

        out["fused"] = fused
    return out


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float,
                    causal: bool = True) -> torch.Tensor:
    """Attention as written in the paper, in the inputs' dtype: query head i reads key/value head i // (Hq / Hkv)."""
    ratio = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(ratio, dim=1), v.repeat_interleave(ratio, dim=1)
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1),
                                        float("-inf"))
        parts.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[a:b]))
    return torch.cat(parts)


def _errors(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad: torch.Tensor,
            truth: list[torch.Tensor], dtype: torch.dtype) -> list[float]:
    """Max-abs errors of fn's output and input gradients (from `inputs` cast to `dtype`) against `truth`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(dtype))
    return [float((x.detach().to(y.dtype) - y).abs().max()) for x, y in zip([out, *(t.grad for t in leaves)], truth)]


def check(kernel: Kernel, lengths: tuple[int, ...], ratio: int, seed: int, device: torch.device,
          dtype: torch.dtype) -> dict:
    """One case in `dtype`: the kernel's errors, the naive implementation's in `dtype`, the bound, and each negative
    control's errors over that bound. The reference computes in the next wider float (fp32 for bf16, fp64 for
    fp32)."""
    bounds = [0, *itertools.accumulate(lengths)]
    gen = torch.Generator(device=device).manual_seed(seed)
    kv_heads = HEADS // ratio
    q, k, v, grad = (torch.randn(bounds[-1], h, HEAD_DIM, generator=gen, device=device).to(dtype)
                     for h in (HEADS, kv_heads, kv_heads, HEADS))
    scale = 1 / math.sqrt(HEAD_DIM)
    inputs = (q, k, v)
    wide = REFERENCE[dtype]
    leaves = [t.to(wide).requires_grad_() for t in inputs]
    out = naive_attention(*leaves, bounds, scale)
    out.backward(grad.to(wide))
    truth = [out.detach(), *(t.grad for t in leaves)]

    naive = _errors(lambda *t: naive_attention(*t, bounds, scale), inputs, grad, truth, dtype)
    bound = [TOLERANCE[dtype] * e for e in naive]
    got = _errors(lambda *t: kernel(*t, bounds, scale), inputs, grad, truth, dtype)
    controls = {"not_causal": lambda q_, k_, v_: naive_attention(q_, k_, v_, bounds, scale, causal=False)}
    if ratio > 1:  # tiled instead of interleaved: query head i reads key/value head i % Hkv
        controls["kv_head_i_mod_hkv"] = lambda q_, k_, v_: kernel(q_, k_.repeat(1, ratio, 1), v_.repeat(1, ratio, 1),
                                                                   bounds, scale)
    cut = next((i for i in range(1, len(bounds) - 1) if bounds[i + 1] - bounds[i] > 1), None)
    if cut is not None:  # the next sequence's first token moved into this one
        shifted = [*bounds[:cut], bounds[cut] + 1, *bounds[cut + 1:]]
        controls["cu_seqlens_off_by_one"] = lambda q_, k_, v_: kernel(q_, k_, v_, shifted, scale)
    missed = {name: max(e / b for e, b in zip(_errors(fn, inputs, grad, truth, dtype), bound))
              for name, fn in controls.items()}
    names = ["out", "dq", "dk", "dv"]
    return {"lengths": list(lengths), "ratio": ratio, "seed": seed, "errors": dict(zip(names, got)),
            "naive_errors": dict(zip(names, naive)), "bounds": dict(zip(names, bound)),
            "passed": all(e <= b for e, b in zip(got, bound)), "controls_over_bound": missed,
            "controls_failed": all(m >= CONTROL_MARGIN for m in missed.values())}


def run(device: torch.device) -> dict:
    """Every kernel on `device` over its cases (GPU_CASES on CUDA, else CPU_CASES): per case and in summary."""
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    out: dict = {"device": str(device), "dtype": str(DTYPE[device.type]), "tolerance": TOLERANCE[DTYPE[device.type]],
                 "control_margin": CONTROL_MARGIN}
    for name, kernel in kernels(device).items():
        results = [check(kernel, lengths, ratio, seed, device, DTYPE[device.type]) for lengths, ratio, seed in cases]
        out[name] = {"cases": len(results), "passed": sum(r["passed"] for r in results),
                     "controls_failed": sum(r["controls_failed"] for r in results),
                     "worst_error_over_bound": max(max(e / b for e, b in zip(r["errors"].values(),
                                                                            r["bounds"].values())) for r in results),
                     "least_control_over_bound": min((m for r in results for m in r["controls_over_bound"].values()),
                                                     default=None),
                     "failures": [r for r in results if not (r["passed"] and r["controls_failed"])]}
    return out
