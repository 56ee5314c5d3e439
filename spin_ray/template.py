"""The one rendering, tokenisation and truncation of a SPIN pair, shared by generation, scoring and training.

uclaml/SPIN sampled y' under an Alpaca prompt and scored it under the Zephyr chat template (uclaml/SPIN#9, #33); here
the generator is fed exactly the prompt token ids that the scorer and trainer put in front of the response.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


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
    the context that the scorer and trainer put in front of it (uclaml/SPIN cut the prompt only when the pair was
    too long, which the generator cannot know).
    """
    return ids[-max_prompt_length:] if len(ids) > max_prompt_length else ids


def encode_pair(tokenizer: Any, prompt: list[dict[str, str]], real: str, generated: str, *, max_length: int,
                max_prompt_length: int) -> dict[str, list[int]]:
    """Tokenise one pair under the one truncation rule: the prompt keeps its last max_prompt_length tokens
    (`truncate_prompt`), then each response is cut to max_length − len(prompt) tokens.

    The scorer applies it once and stores the ids with the pairs; the trainer reads them, never re-tokenises.
    """
    p = truncate_prompt(prompt_ids(tokenizer, prompt), max_prompt_length)
    room = max_length - len(p)
    return {"prompt_ids": p, "real_ids": response_ids(tokenizer, real)[:room],
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


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log π(response | prompt) per sequence, shape (N,), in float32.

    Only positions with a label count: prompt and padding are masked, the appended EOS is included.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    return (token_logps * (labels != IGNORE)).sum(-1)


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
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1]
    labels, segment = batch["labels"][:, 1:], batch["segment"][:, 1:]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    token_logps = token_logps * (labels != IGNORE)
    return (token_logps * (segment == 1)).sum(-1), (token_logps * (segment == 2)).sum(-1)
