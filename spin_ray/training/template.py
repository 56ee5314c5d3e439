"""The one rendering, tokenisation and truncation of a SPIN pair, shared by generation, scoring and training.

uclaml/SPIN sampled y' under an Alpaca prompt and scored it under the Zephyr chat template (uclaml/SPIN#9, #33); here
the generator is fed exactly the prompt token ids that the trainer puts in front of the response.

Also the batch layout of those ids and its log-probs: `pack_varlen` + `varlen_attention` (the scorer's and the
trainer's: whole sequences flattened, no padding) and `head_logps` (the LM head at the labelled positions only, in
chunks). The padded layouts it replaced are benchmarks/baselines.py's.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

IGNORE = -100
CHUNK_TOKENS = 1024
"""Labelled positions per LM-head chunk in `head_logps`: the most fp32 logits held at once (1024 x vocab x 4 bytes,
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


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-softmax of the head's logits gathered at `targets`: (N, H) -> (N,), float32."""
    return -F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def head_logps(model: torch.nn.Module, positions: torch.Tensor, targets: torch.Tensor, *,
               chunk_tokens: int = CHUNK_TOKENS, **inputs: Any) -> torch.Tensor:
    """log π(targets[i] | tokens ≤ positions[i]) for each i, shape (N,), float32: `positions` index the model's
    (B·W) flattened tokens, `targets` are the tokens that follow them. `inputs` go to the model's forward.

    Only those positions go through the LM head, `chunk_tokens` at a time, and each chunk's logits are recomputed in
    the backward pass (activation checkpointing), so the vocabulary-wide logits of the prompt and padding positions
    never exist, nor those of more than one chunk. The head's forward is replaced for this one call, so the model's
    own forward (FSDP2's all-gathers and DDP's hooks included) runs as usual around it. Index tensors, not masks: N is
    known on the host, so nothing waits for the device.
    """
    hf = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    config = hf.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        raise ValueError(f"{type(hf).__name__} transforms its logits after the LM head (softcapping or scaling); "
                         "spin_ray's log-probs take the head's output as the logits")
    head = hf.get_output_embeddings()
    if head.bias is not None:
        raise ValueError(f"{type(hf).__name__}'s LM head has a bias; spin_ray's log-probs assume none")

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # in place of head.forward: (B, W, H) -> (N,)
        h = hidden.flatten(0, 1).index_select(0, positions)
        parts = [checkpoint(_chunk_logps, h[i:i + chunk_tokens], head.weight, targets[i:i + chunk_tokens],
                            use_reentrant=False) for i in range(0, len(targets), chunk_tokens)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)

    head.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        return model(**inputs).logits
    finally:
        del head.forward


VARLEN = "spin_varlen"
"""The attention implementation (transformers' AttentionInterface) that `pack_varlen` batches need: set it with
`model.set_attn_implementation(VARLEN)`. On CUDA it runs torch's fused varlen kernel over the whole flattened batch
(a model it cannot serve falls back to one SDPA call per sequence, said once in the log); elsewhere, and under
VARLEN_SDPA, one SDPA call per sequence."""
VARLEN_SDPA = "spin_varlen_sdpa"
"""The per-sequence SDPA form of VARLEN on every device: the exact reference the fused kernel is checked against."""

log = logging.getLogger(__name__)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting: on CUDA copied from pinned memory with non_blocking (a copy from
    pageable memory waits for the device's queue to drain)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class VarlenBatch:
    """A micro-batch as one flattened row of whole sequences (`pack_varlen`), with everything the step needs to know
    about its layout computed on the host when it is built, so the device never has to be asked: index tensors
    instead of masks, the sequence bounds on the host and the longest length as an int.

    `input_ids`, `position_ids`: (1, T). `cu_seqlens`: (S + 1,) int32 cumulative lengths from 0, for the fused kernel
    (moves with the batch); `bounds`: the same, int64, always on the host (the per-sequence path slices by it).
    `label_pos`, `label_ids`, `label_seq`: (N,) each labelled token's preceding position, its id and its sequence
    (2i: pair i's real sequence, 2i + 1: its generated one)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    bounds: torch.Tensor
    max_length: int
    label_pos: torch.Tensor
    label_ids: torch.Tensor
    label_seq: torch.Tensor
    pairs: int

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> "VarlenBatch":
        """The device tensors on `device` in one copy: on CUDA from pinned memory, asynchronously (the host goes on
        building the step while the copy runs). `bounds` stays on the host."""
        if device.type == "cpu":
            return self
        moved = (self.input_ids, self.position_ids, self.label_pos, self.label_ids, self.label_seq, self.cu_seqlens)
        flat = to_device(torch.cat([t.flatten().long() for t in moved]), device)
        ids, pos, label_pos, label_ids, label_seq, cu = flat.split([t.numel() for t in moved])
        return replace(self, input_ids=ids.view(1, -1), position_ids=pos.view(1, -1), label_pos=label_pos,
                       label_ids=label_ids, label_seq=label_seq, cu_seqlens=cu.int())


def pack_varlen(pairs: Sequence[Mapping[str, list[int]]]) -> VarlenBatch:
    """A micro-batch as one flattened row of whole sequences, no padding and no mask: for each pair, prompt + real
    then prompt + generated, each with its own positions from 0, delimited by their cumulative lengths (for
    `varlen_attention`). Only the response tokens are labelled (the appended EOS included)."""
    ids: list[int] = []
    positions: list[int] = []
    label_pos: list[int] = []
    label_ids: list[int] = []
    label_seq: list[int] = []
    bounds = [0]
    if any(not p["prompt_ids"] for p in pairs):
        raise ValueError("every pair needs a prompt token: the first answer token is predicted from it")
    for i, p in enumerate(pairs):
        for s, key in ((2 * i, "real_ids"), (2 * i + 1, "generated_ids")):
            start, answer = bounds[-1] + len(p["prompt_ids"]), p[key]
            ids += p["prompt_ids"] + answer
            positions += range(len(p["prompt_ids"]) + len(answer))
            label_pos += range(start - 1, start - 1 + len(answer))  # each answer token is predicted one before
            label_ids += answer
            label_seq += [s] * len(answer)
            bounds.append(len(ids))
    cu = torch.tensor(bounds, dtype=torch.long)
    return VarlenBatch(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
                       cu_seqlens=cu.int(), bounds=cu, max_length=max(b - a for a, b in zip(bounds, bounds[1:])),
                       label_pos=torch.tensor(label_pos, dtype=torch.long),
                       label_ids=torch.tensor(label_ids, dtype=torch.long),
                       label_seq=torch.tensor(label_seq, dtype=torch.long), pairs=len(pairs))


def varlen_logps(model: torch.nn.Module, batch: VarlenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(response | prompt) of each pair's real and generated sequence in a `pack_varlen` batch, float32.
    The model's attention becomes VARLEN unless it is VARLEN or VARLEN_SDPA (both compute padded batches as SDPA did)."""
    hf = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if hf.config._attn_implementation not in (VARLEN, VARLEN_SDPA):
        hf.set_attn_implementation(VARLEN)
    token_logps = head_logps(model, batch.label_pos, batch.label_ids, input_ids=batch.input_ids,
                             position_ids=batch.position_ids, cu_seq_lens_q=batch.cu_seqlens,
                             max_length_q=batch.max_length, seq_bounds=batch.bounds)
    sums = token_logps.new_zeros(2 * batch.pairs).index_add(0, batch.label_seq, token_logps)
    return sums[0::2], sums[1::2]


@functools.cache
def _fused_kernel_missing() -> str | None:
    """Why this torch has no varlen kernel that `fused_attention` can call, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    missing = {"scale", "window_size", "enable_gqa"} - set(inspect.signature(varlen_attn).parameters)
    return f"torch {torch.__version__}'s varlen_attn takes no {sorted(missing)}" if missing else None


def _fused_unsupported(query: torch.Tensor, key: torch.Tensor, dropout: float) -> str | None:
    """Why torch's fused varlen kernel cannot compute this CUDA attention call, or None when it can."""
    if missing := _fused_kernel_missing():
        return missing
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"the flash kernel computes in float16 or bfloat16, not {query.dtype}"
    if dropout:
        return f"attention dropout {dropout} (the fused kernel has none)"
    if query.shape[-1] > 256 or query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads of dim {query.shape[-1]} over {key.shape[1]} key/value heads"
    return None


@functools.cache
def _say_fallback(model: str, reason: str) -> None:
    log.warning("%s: attention by one SDPA call per sequence instead of the fused varlen kernel: %s", model, reason)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_length: int,
                    scale: float | None) -> torch.Tensor:
    """Causal attention within each sequence by torch's varlen flash-attention kernel, one call for the batch:
    q (T, Hq, D), k and v (T, Hkv, D) with Hq a multiple of Hkv (query head i reads key/value head i // (Hq / Hkv)),
    `cu_seqlens` int32 on q's device, `max_length` the longest sequence -> (T, Hq, D)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, scale=scale, window_size=(-1, 0),
                       enable_gqa=q.shape[1] != k.shape[1])


def per_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: Sequence[int],
                           scale: float | None, dropout: float = 0.0) -> torch.Tensor:
    """The same attention as `fused_attention` by one SDPA call per sequence, `bounds` the cumulative lengths as
    host ints: (T, Hq, D)."""
    gqa = q.shape[1] != k.shape[1]
    parts = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), dropout_p=dropout,
                                            is_causal=b - a > 1, scale=scale, enable_gqa=gqa)[0].transpose(0, 1)
             for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts)


# torch.compile traces through the per-sequence path as one op (its Python loop runs over host bounds that the
# graph cannot know); the backward recomputes the forward, since the op keeps no autograd graph of its own.
@torch.library.custom_op("spin_ray::per_sequence_attention", mutates_args=())
def _per_sequence_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                     scale: float | None) -> torch.Tensor:
    return per_sequence_attention(q, k, v, bounds.numpy().tolist(), scale)


@torch.library.custom_op("spin_ray::per_sequence_attention_backward", mutates_args=())
def _per_sequence_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              bounds: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    # torch.func: a custom op's kernel runs below autograd, where tensor.backward would record nothing
    cuts = bounds.numpy().tolist()
    _, vjp = torch.func.vjp(lambda *qkv: per_sequence_attention(*qkv, cuts, scale), q, k, v)
    return vjp(grad)


@_per_sequence_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, scale: float | None) -> torch.Tensor:
    return torch.empty_like(q)


@_per_sequence_backward_op.register_fake
def _(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
      scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _per_sequence_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    q, k, v, bounds, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, bounds)


def _per_sequence_grad(ctx: Any, grad: torch.Tensor) -> tuple:
    q, k, v, bounds = ctx.saved_tensors
    return *_per_sequence_backward_op(grad, q, k, v, bounds, ctx.scale), None, None


_per_sequence_op.register_autograd(_per_sequence_grad, setup_context=_per_sequence_setup)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, *,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     seq_bounds: torch.Tensor | None = None, fused: bool = True,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence of a flattened batch (`varlen_logps` passes its VarlenBatch's
    `cu_seqlens`, `max_length` and host `bounds`), so no mask exists and no query meets another sequence's keys: on
    CUDA (with `fused`) `fused_attention`, else `per_sequence_attention`. Without `cu_seq_lens_q` it is
    transformers' SDPA attention: a 4D mask (benchmarks/baselines.pack_pairs) is used as given; for a 2D padding mask
    transformers builds none under a custom attention, and causal attention never reaches a right-padded batch's
    padding (baselines.collate), so such batches compute as before."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, heads, tokens, dim) -> (tokens, heads, dim)
    if fused and query.is_cuda:
        reason = _fused_unsupported(query, key, dropout)
        if reason is None:
            return fused_attention(q, k, v, cu_seq_lens_q, max_length_q, scaling).unsqueeze(0), None
        _say_fallback(module.config.name_or_path or type(module).__name__, reason)
    if torch.compiler.is_compiling():
        if dropout:
            raise ValueError("compiled per-sequence attention takes no dropout (train.compile with attention_dropout)")
        return _per_sequence_op(q, k, v, seq_bounds, scaling).unsqueeze(0), None
    return per_sequence_attention(q, k, v, seq_bounds.numpy().tolist(), scaling, dropout).unsqueeze(0), None


def varlen_sdpa_attention(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    return varlen_attention(*args, **kwargs, fused=False)


AttentionInterface.register(VARLEN, varlen_attention)
AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
