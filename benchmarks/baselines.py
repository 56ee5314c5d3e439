"""The padded layouts the trainer's flattened one (spin_ray.training.template.pack_varlen) replaced, kept as exact
references for its log-probs and as the baselines the benchmarks time it against: `collate` (2B sequences padded to
the longest), `pack_pairs` (each pair in one row, a block-diagonal causal mask), their log-probs through the
package's chunked LM head (`label_logps`); `padded_micro_batches`, how such rows were cut into micro-batches."""

from __future__ import annotations

from typing import Sequence

import torch

from spin_ray.training.batching import even_out
from spin_ray.training.template import CHUNK_TOKENS, IGNORE, head_logps

# Padding share a token-budget micro-batch of padded rows may reach by default: a forward costs about its padded
# tokens, so a few more, narrower forwards cost less than the padding they avoid.
MAX_PADDING = 0.1


def padded_micro_batches(rows: Sequence[int], lengths: Sequence[int], *, max_pairs: int | None,
                         max_tokens: int | None, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """batching.micro_batches for rows padded to the longest (`pack_pairs`, `collate`): B pairs cost B·max(length)
    tokens, and under a token budget a micro-batch also ends before its padding would pass `max_padding` of its
    tokens (a large budget would otherwise take a whole long-tailed share in one forward, padded to its longest row)."""
    out: list[list[int]] = []
    current: list[int] = []
    width = real = 0
    for i in sorted(rows, key=lambda i: lengths[i]):
        wider = max(width, lengths[i])
        cost = (len(current) + 1) * wider
        full = (max_pairs is not None and len(current) >= max_pairs) or (max_tokens is not None and (
            cost > max_tokens or cost - real - lengths[i] > max_padding * cost))
        if current and full:
            out.append(current)
            current, wider, real = [], lengths[i], 0
        current.append(i)
        width, real = wider, real + lengths[i]
    return out + ([current] if current else [])


def even_padded_micro_batches(shares: list[list[int]], lengths: Sequence[int], *, max_pairs: int | None,
                              max_tokens: int | None, max_padding: float = MAX_PADDING) -> list[list[list[int]]]:
    return even_out([padded_micro_batches(s, lengths, max_pairs=max_pairs, max_tokens=max_tokens,
                                          max_padding=max_padding) for s in shares])


def collate(pairs: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B sequences: the B real ones first, then the B generated ones.

    `labels` holds the token ids at response positions and IGNORE at prompt and padding positions.
    """
    seqs = [(p["prompt_ids"], p[key]) for key in ("real_ids", "generated_ids") for p in pairs]
    width = max(len(q) + len(a) for q, a in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (q, a) in enumerate(seqs):
        n = len(q) + len(a)
        input_ids[i, :n] = torch.tensor(q + a)
        labels[i, len(q):n] = torch.tensor(a)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def label_logps(model: torch.nn.Module, labels: torch.Tensor, *, chunk_tokens: int = CHUNK_TOKENS,
                **inputs: torch.Tensor) -> torch.Tensor:
    """log π(labels[:, t+1] | tokens ≤ t) at every position t whose next label is not IGNORE, 0 elsewhere: shape
    (B, W − 1), float32, by the package's `head_logps`."""
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    logps = head_logps(model, rows * labels.shape[1] + cols, labels[rows, cols + 1], chunk_tokens=chunk_tokens,
                       **inputs)
    return logps.new_zeros(labels.shape[0], labels.shape[1] - 1).index_put((rows, cols), logps)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log π(response | prompt) per sequence, shape (N,), in float32.

    Only positions with a label count: prompt and padding are masked, the appended EOS is included.
    """
    return label_logps(model, batch["labels"], input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).sum(-1)


def pack_pairs(pairs: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair, padding-free inside it: [prompt + real][prompt + generated] side by side, each sequence
    with its own positions from 0 and a block-diagonal causal mask, so neither attends to the other; rows are
    right-padded to the longest (length-grouped micro-batches keep that small).

    `attention_mask` is 4D boolean (B, 1, W, W), which transformers passes to SDPA as it is; a padding position
    attends to itself only (a query that attends to nothing gives NaN). `segment` is 1 on the real sequence's
    tokens, 2 on the generated one's, 0 on padding; `labels` as in `collate`.
    """
    seqs = [(p["prompt_ids"] + p["real_ids"], p["prompt_ids"] + p["generated_ids"], len(p["prompt_ids"]))
            for p in pairs]
    width = max(len(a) + len(b) for a, b, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    segment = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(len(seqs), 1, 1, 1)
    for i, (a, b, n_prompt) in enumerate(seqs):
        start = 0
        for seg, seq in ((1, a), (2, b)):
            end = start + len(seq)
            input_ids[i, start:end] = torch.tensor(seq)
            position_ids[i, start:end] = torch.arange(len(seq))
            labels[i, start + n_prompt:end] = torch.tensor(seq[n_prompt:])
            segment[i, start:end] = seg
            mask[i, 0, start:end, start:end] = torch.ones(len(seq), len(seq), dtype=torch.bool).tril()
            start = end
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask, "labels": labels,
            "segment": segment}


def packed_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(response | prompt) of the real and of the generated sequence of each packed row, float32."""
    token_logps = label_logps(model, batch["labels"], input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    segment = batch["segment"][:, 1:]
    return (token_logps * (segment == 1)).sum(-1), (token_logps * (segment == 2)).sum(-1)


