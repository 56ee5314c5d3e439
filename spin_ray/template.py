"""The one rendering, tokenisation and truncation of a SPIN pair, shared by generation, scoring and training.

uclaml/SPIN sampled y' under an Alpaca prompt and scored it under the Zephyr chat template (uclaml/SPIN#9, #33); here
the generator is fed exactly the prompt token ids that the trainer puts in front of the response.

Also the batch layouts of those ids and their log-probs: `pack_varlen` + `varlen_attention` (the scorer's and the
trainer's: whole sequences flattened, no padding), `collate` and `pack_pairs` (padded layouts, kept as exact
references and benchmark baselines), and `label_logps` (the LM head at the labelled positions only, in chunks).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

IGNORE = -100
CHUNK_TOKENS = 1024
"""Labelled positions per LM-head chunk in `label_logps`: the most fp32 logits held at once (1024 x vocab x 4 bytes,
128 MB at a 32k vocabulary), instead of every position's."""


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-template rendering of `messages`, ending with the assistant header."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    # The template writes any BOS it wants itself; add_special_tokens=False keeps tokenizers from adding another.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a response, ending with EOS (the paper's collator appends it, truncated answers included)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def truncate_prompt(ids: list[int], max_prompt_length: int) -> list[int]:
    """The prompt part of the one truncation rule: keep the last max_prompt_length tokens (the question is at the end).

    It depends on the prompt alone, so the generator applies it before any answer exists and samples y' on exactly
    the context that the trainer puts in front of it (uclaml/SPIN cut the prompt only when the pair was
    too long, which the generator cannot know).
    """
    return ids[-max_prompt_length:] if len(ids) > max_prompt_length else ids


def encode_pair(tokenizer: Any, prompt: list[dict[str, str]], real: str, generated: str, *, max_length: int,
                max_prompt_length: int) -> dict[str, list[int]]:
    """Tokenise one pair under the one truncation rule: the prompt keeps its last max_prompt_length tokens
    (`truncate_prompt`), then each response is cut to max_length − len(prompt) tokens (`answer_ids`).

    Generation applies it once and stores the ids with the pairs; the trainer reads them, never re-tokenises.
    """
    return answer_ids(tokenizer, truncate_prompt(prompt_ids(tokenizer, prompt), max_prompt_length), real, generated,
                      max_length=max_length)


def answer_ids(tokenizer: Any, prompt: list[int], real: str, generated: str, *,
               max_length: int) -> dict[str, list[int]]:
    """A pair's ids from its already truncated prompt ids: each response cut to max_length − len(prompt) tokens."""
    room = max_length - len(prompt)
    return {"prompt_ids": prompt, "real_ids": response_ids(tokenizer, real)[:room],
            "generated_ids": response_ids(tokenizer, generated)[:room]}


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


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-softmax of the head's logits gathered at `targets`: (N, H) -> (N,), float32."""
    return -F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def label_logps(model: torch.nn.Module, labels: torch.Tensor, *, chunk_tokens: int = CHUNK_TOKENS,
                **inputs: torch.Tensor) -> torch.Tensor:
    """log π(labels[:, t+1] | tokens ≤ t) at every position t whose next label is not IGNORE, 0 elsewhere: shape
    (B, W − 1), float32. `inputs` go to the model's forward.

    Only the labelled positions go through the LM head, `chunk_tokens` at a time, and each chunk's logits are
    recomputed in the backward pass (activation checkpointing), so the vocabulary-wide logits of the prompt and padding
    positions never exist, nor those of more than one chunk. The head's forward is replaced for this one call, so
    the model's own forward (FSDP2's all-gathers and DDP's hooks included) runs as usual around it.
    """
    hf = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    config = hf.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        raise ValueError(f"{type(hf).__name__} transforms its logits after the LM head (softcapping or scaling); "
                         "spin_ray's log-probs take the head's output as the logits")
    head = hf.get_output_embeddings()
    if head.bias is not None:
        raise ValueError(f"{type(hf).__name__}'s LM head has a bias; spin_ray's log-probs assume none")
    targets = labels[:, 1:]
    where = targets != IGNORE

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # in place of head.forward: (B, W, H) -> (B, W - 1)
        h, t = hidden[:, :-1][where], targets[where]
        parts = [checkpoint(_chunk_logps, h[i:i + chunk_tokens], head.weight, t[i:i + chunk_tokens],
                            use_reentrant=False) for i in range(0, len(t), chunk_tokens)]
        out = torch.zeros(where.shape, dtype=torch.float32, device=hidden.device)
        return out.masked_scatter(where, torch.cat(parts)) if parts else out

    head.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        return model(**inputs).logits
    finally:
        del head.forward


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


VARLEN = "spin_varlen"
"""The attention implementation (transformers' AttentionInterface) that `pack_varlen` batches need: set it with
`model.set_attn_implementation(VARLEN)`. On CUDA it runs torch's fused varlen kernel over the whole flattened batch;
elsewhere, and under VARLEN_SDPA, one SDPA call per sequence."""
VARLEN_SDPA = "spin_varlen_sdpa"
"""The per-sequence SDPA form of VARLEN on every device: the exact reference the fused kernel is checked against."""


@functools.cache
def _fused_varlen() -> Any:
    """Causal varlen attention over (tokens, heads, dim) tensors by torch's flash-attention kernel
    (`torch.nn.attention.varlen.varlen_attn`), or None where torch has none. Its releases differ: a causal window or
    `is_causal`, grouped key/value heads and a scale taken or not (None where the scale is needed and not taken)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
               scale: float | None) -> torch.Tensor | None:
        extra = {}
        if "scale" in params:
            extra["scale"] = scale
        elif scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5):
            return None
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu, cu, longest, longest, **causal, **extra)

    return attend


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, *,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     fused: bool = True, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence of a flattened batch, the sequences delimited by `cu_seq_lens_q` (their
    cumulative lengths from 0; `max_length_q` the longest), so no mask exists and no query meets another sequence's
    keys: on CUDA (with `fused`) one varlen flash-attention call for the batch, else transformers' own SDPA call on each sequence. Without
    `cu_seq_lens_q` it is transformers' SDPA attention: a 4D mask (pack_pairs) is used as given; for a 2D padding mask
    transformers builds none under a custom attention, and causal attention never reaches a right-padded batch's
    padding (collate), so such batches compute as before."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kernel = _fused_varlen() if fused and query.is_cuda and dropout == 0.0 else None
    if kernel is not None:
        # (1, heads, tokens, dim) -> (tokens, heads, dim)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        longest = max_length_q or int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        out = kernel(q, k, v, cu_seq_lens_q, longest, scaling)
        if out is not None:
            return out.unsqueeze(0), None
    bounds = cu_seq_lens_q.tolist()
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                                    scaling=scaling)[0] for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts, dim=1), None


def varlen_sdpa_attention(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    return varlen_attention(*args, **kwargs, fused=False)


AttentionInterface.register(VARLEN, varlen_attention)
AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)


def pack_varlen(pairs: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """A micro-batch as one flattened row of whole sequences, no padding and no mask: for each pair, prompt + real
    then prompt + generated, each with its own positions from 0; `cu_seq_lens_q` their cumulative lengths (int32,
    from 0) for `varlen_attention`. `segment` is 1 on real tokens and 2 on generated ones, `pair` the pair's index,
    `labels` as in `collate`."""
    ids, labels, positions, segment, pair, lengths = [], [], [], [], [], [0]
    for i, p in enumerate(pairs):
        for seg, key in ((1, "real_ids"), (2, "generated_ids")):
            seq = p["prompt_ids"] + p[key]
            ids += seq
            labels += [IGNORE] * len(p["prompt_ids"]) + p[key]
            positions += range(len(seq))
            segment += [seg] * len(seq)
            pair += [i] * len(seq)
            lengths.append(lengths[-1] + len(seq))
    row = {"input_ids": ids, "labels": labels, "position_ids": positions, "segment": segment, "pair": pair}
    return {**{k: torch.tensor([v], dtype=torch.long) for k, v in row.items()},
            "cu_seq_lens_q": torch.tensor(lengths, dtype=torch.int32)}


def varlen_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(response | prompt) of each pair's real and generated sequence in a `pack_varlen` batch, float32.
    The model's attention becomes VARLEN unless it is VARLEN or VARLEN_SDPA (both compute padded batches as SDPA did)."""
    hf = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if hf.config._attn_implementation not in (VARLEN, VARLEN_SDPA):
        hf.set_attn_implementation(VARLEN)
    cu = batch["cu_seq_lens_q"]
    token_logps = label_logps(model, batch["labels"], input_ids=batch["input_ids"],
                              position_ids=batch["position_ids"], cu_seq_lens_q=cu,
                              max_length_q=int((cu[1:] - cu[:-1]).max()))[0]
    segment, pair = batch["segment"][0, 1:], batch["pair"][0, 1:]
    n = int(batch["pair"].max()) + 1
    return tuple(torch.zeros(n, dtype=torch.float32, device=token_logps.device).index_add(
        0, pair[segment == s], token_logps[segment == s]) for s in (1, 2))
