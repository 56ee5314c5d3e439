"""Log-probs through the LM head at the labelled positions only, in chunks (template.label_logps), against the
full-vocabulary logits at every position that the trainer and scorer computed before: equal values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spin_ray.models import load_model
from spin_ray.template import IGNORE, collate, label_logps, pack_pairs, packed_logps, sequence_logps

PAIRS = [{"prompt_ids": [5, 6, 7], "real_ids": [8, 9, 2], "generated_ids": [10, 2]},
         {"prompt_ids": [5, 11], "real_ids": [12, 13, 14, 2], "generated_ids": [15, 16, 2]},
         {"prompt_ids": [7, 7, 8, 9], "real_ids": [3, 2], "generated_ids": [4, 4, 4, 2]}]


def full_logits_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The former path: logits of every position, fp32 log-softmax, masked to the labels."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    return token_logps * (labels != IGNORE)


def grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1024])
def test_chunked_logps_and_gradients_equal_the_full_logits_path(tiny_model, chunk_tokens):
    model = load_model(tiny_model, dtype=torch.float32)
    batch = pack_pairs(PAIRS, 0)
    chunked = label_logps(model, batch["labels"], chunk_tokens=chunk_tokens, input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    full = full_logits_logps(model, batch)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    # A loss that weighs tokens unequally, so that every position's gradient counts.
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(0))
    for a, b in zip(grads(model, (chunked * weights).sum()), grads(model, (full * weights).sum())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_and_padded_sums_use_the_chunked_path(tiny_model):
    model = load_model(tiny_model, dtype=torch.float32)
    packed = pack_pairs(PAIRS, 0)
    full = full_logits_logps(model, packed)
    segment = packed["segment"][:, 1:]
    real, generated = packed_logps(model, packed)
    torch.testing.assert_close(real, (full * (segment == 1)).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(generated, (full * (segment == 2)).sum(-1), rtol=1e-5, atol=1e-5)
    padded = collate(PAIRS, 0)
    torch.testing.assert_close(sequence_logps(model, padded), full_logits_logps(model, padded).sum(-1), rtol=1e-5,
                               atol=1e-5)
    # The padded and the packed layouts give the same log-probs (the scorer's and the trainer's).
    torch.testing.assert_close(sequence_logps(model, padded), torch.cat([real, generated]), rtol=1e-5, atol=1e-5)


def test_the_head_is_restored_after_the_call(tiny_model):
    model = load_model(tiny_model, dtype=torch.float32)
    batch = collate(PAIRS, 0)
    sequence_logps(model, batch)
    assert "forward" not in vars(model.get_output_embeddings())
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == model.config.vocab_size


def test_flattened_varlen_batches_equal_the_dense_block_mask(tiny_model):
    """template.pack_varlen + varlen_attention (per-sequence SDPA, no mask) against pack_pairs' (B, 1, W, W) block
    mask: the same log-probs and gradients; then padded batches on the switched model still equal the dense path."""
    from spin_ray.template import VARLEN, pack_varlen, varlen_logps

    dense_model, varlen_model = (load_model(tiny_model, dtype=torch.float32) for _ in range(2))
    dense = packed_logps(dense_model, pack_pairs(PAIRS, 0))
    varlen = varlen_logps(varlen_model, pack_varlen(PAIRS))
    assert varlen_model.config._attn_implementation == VARLEN
    for a, b in zip(varlen, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(varlen_model, (varlen[0] - 2 * varlen[1]).sum()),
                    grads(dense_model, (dense[0] - 2 * dense[1]).sum())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    batch = pack_varlen(PAIRS)
    assert batch.input_ids.shape == (1, sum(2 * len(p["prompt_ids"]) + len(p["real_ids"]) + len(p["generated_ids"])
                                               for p in PAIRS))  # no padding
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(varlen_model, collate(PAIRS, 0)),
                                   sequence_logps(dense_model, collate(PAIRS, 0)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed_logps(varlen_model, pack_pairs(PAIRS, 0)), packed_logps(
            dense_model, pack_pairs(PAIRS, 0)), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused varlen kernel runs on CUDA only")
@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped key/value heads, as Mistral's
def test_fused_varlen_on_cuda_is_as_close_to_fp32_as_per_sequence_sdpa(kv_heads):
    """On CUDA, VARLEN is one flash-attention call over the flattened batch. In bf16 it cannot equal anything
    exactly, so both bf16 paths are held against fp32 per-sequence SDPA: the fused one may err by as much as
    per-sequence SDPA does, within the spread of bf16 rounding (a few times), in the log-probs and the gradients."""
    pytest.importorskip("torch.nn.attention.varlen")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spin_ray.template import VARLEN, VARLEN_SDPA, pack_varlen, varlen_logps

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, head_dim=64, vocab_size=1024, max_position_embeddings=2048)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).cuda()
    gen = torch.Generator().manual_seed(1)
    lengths = [(37, 200, 150), (5, 900, 3), (300, 64, 640), (1, 2, 1)]
    pairs = [{k: torch.randint(3, 1024, (n,), generator=gen).tolist()
              for k, n in zip(("prompt_ids", "real_ids", "generated_ids"), ls)} for ls in lengths]
    batch = pack_varlen(pairs).to(torch.device("cuda"))

    def run(impl: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).cuda()
        model.load_state_dict(base.state_dict())
        model.set_attn_implementation(impl)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            real, generated = varlen_logps(model, batch)
        fused_ops = [e.key for e in prof.key_averages() if "varlen_attn" in e.key]  # torch_attn::_varlen_attn
        assert bool(fused_ops) == (impl == VARLEN), fused_ops  # the fused kernel ran, or did not
        (real.sum() - 2 * generated.sum()).backward()
        assert model.config._attn_implementation == impl
        grad = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        return torch.cat([real, generated]).double(), grad

    truth, truth_grad = run(VARLEN_SDPA, torch.float32)
    sdpa, sdpa_grad = run(VARLEN_SDPA, torch.bfloat16)
    fused, fused_grad = run(VARLEN, torch.bfloat16)
    sdpa_err, fused_err = ((x - truth).abs().max().item() for x in (sdpa, fused))
    scale = truth.abs().max().item()  # sums of up to ~1000 tokens' log-probs: thousands of nats
    assert fused_err <= 4 * sdpa_err + 1e-5 * scale, (fused_err, sdpa_err, scale)
    rel = [float((g - truth_grad).norm() / truth_grad.norm()) for g in (sdpa_grad, fused_grad)]
    assert rel[1] <= 4 * rel[0] + 1e-3, rel
