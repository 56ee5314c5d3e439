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


def encode_pair(tokenizer: Any, prompt: list[dict[str, str]], real: str, generated: str, *, max_length: int,
                max_prompt_length: int) -> dict[str, list[int]]:
    """Tokenise one pair and truncate it as uclaml/SPIN did.

    If prompt + the longer response exceeds max_length, the prompt keeps its last max_prompt_length tokens; if it
    still does, both responses are cut to max_length − len(prompt) tokens.
    """
    p, r, g = prompt_ids(tokenizer, prompt), response_ids(tokenizer, real), response_ids(tokenizer, generated)
    if len(p) + max(len(r), len(g)) > max_length:
        p = p[-max_prompt_length:]
        r, g = r[: max_length - len(p)], g[: max_length - len(p)]
    return {"prompt_ids": p, "real_ids": r, "generated_ids": g}


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
