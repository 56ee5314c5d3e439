"""Log-probs through the LM head at the labelled positions only, in chunks (template.head_logps, by the padded
layouts of benchmarks/baselines.py and by the trainer's flattened one), against the
full-vocabulary logits at every position that the trainer and scorer computed before: equal values and gradients."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from baselines import collate, label_logps, pack_pairs, packed_logps, sequence_logps  # noqa: E402

from spin_ray.models.loading import load_model  # noqa: E402
from spin_ray.training.template import IGNORE  # noqa: E402

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
    from spin_ray.training.template import VARLEN, pack_varlen, varlen_logps

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
