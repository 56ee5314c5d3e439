"""How a window's pairs become optimizer steps and micro-batches: the steps of an epoch, each step's pairs dealt to
the workers by length, each worker's share cut into micro-batches (by pairs or by a token budget) and evened out
across workers. Pure Python, no Ray or Arrow: the Train workers (spin_ray.stages.train) and the benchmarks share it."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Padding share a token-budget micro-batch may reach by default: a forward costs about its padded tokens, so a few
# more, narrower forwards cost less than the padding they avoid.
MAX_PADDING = 0.1


def plan_steps(n_rows: int, global_batch: int, num_workers: int) -> list[int]:
    """Rows per optimizer step in one epoch: full global batches, then the remainder cut to a multiple of the
    worker count (every DDP worker must take part in every step)."""
    sizes = [global_batch] * (n_rows // global_batch)
    tail = (n_rows % global_batch) // num_workers * num_workers
    return sizes + ([tail] if tail else [])


def worker_shares(step_rows: Sequence[int], lengths: Sequence[int], world: int) -> list[list[int]]:
    """One optimizer step's rows dealt to the workers in order of length, so every worker gets as many pairs and
    about as many tokens (no straggler); the step's set of pairs, hence its mean loss, is the random global batch."""
    ranked = sorted(step_rows, key=lambda i: lengths[i])
    return [ranked[r::world] for r in range(world)]


def micro_batches(rows: Sequence[int], lengths: Sequence[int], *, max_pairs: int | None, max_tokens: int | None,
                  max_padding: float = MAX_PADDING, padded: bool = False) -> list[list[int]]:
    """A worker's share split into length-grouped micro-batches.

    `lengths[i]` is pair i's two sequences' tokens (prompt twice, both answers); `max_pairs` bounds the pairs of a
    micro-batch and `max_tokens` its cost. By default, the trainer's layout: the pairs' sequences are flattened
    without padding (template.pack_varlen), and a micro-batch costs the sum of its lengths. `padded` (the benchmarks'
    baseline, benchmarks/baselines.pack_pairs): B pairs are B rows padded to the longest, costing B·max(length)
    tokens, and under a token budget a micro-batch also ends before its padding would pass `max_padding` of its tokens
    (a large budget would otherwise take a whole long-tailed share in one forward, padded to its longest row).
    """
    out: list[list[int]] = []
    current: list[int] = []
    width = real = 0
    for i in sorted(rows, key=lambda i: lengths[i]):
        wider = max(width, lengths[i])
        cost = (len(current) + 1) * wider if padded else real + lengths[i]
        full = (max_pairs is not None and len(current) >= max_pairs) or (max_tokens is not None and (
            cost > max_tokens or cost - real - lengths[i] > max_padding * cost))
        if current and full:
            out.append(current)
            current, wider, real = [], lengths[i], 0
        current.append(i)
        width, real = wider, real + lengths[i]
    return out + ([current] if current else [])


def even_micro_batches(shares: list[list[int]], lengths: Sequence[int], *, max_pairs: int | None,
                       max_tokens: int | None, max_padding: float = MAX_PADDING,
                       padded: bool = False) -> list[list[list[int]]]:
    """Every worker's micro-batches, the larger ones split until all workers run the same number: each FSDP2
    forward all-gathers across workers, so one worker with an extra micro-batch would wait forever."""
    plans = [micro_batches(share, lengths, max_pairs=max_pairs, max_tokens=max_tokens, max_padding=max_padding,
                           padded=padded) for share in shares]
    n = max(map(len, plans))
    for plan in plans:
        while len(plan) < n:  # each share has as many pairs as the largest plan's micro-batches, so this ends
            j = max(range(len(plan)), key=lambda k: len(plan[k]))
            half = len(plan[j]) // 2
            plan[j:j + 1] = [plan[j][:half], plan[j][half:]]
    return plans


def epoch_plan(lengths: Sequence[int], steps: Sequence[int], seed: int, epoch: int,
               world: int) -> tuple[list[int], list[list[list[int]]]]:
    """One epoch's seeded order of the rows and, per optimizer step, each worker's share of its global batch."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    bounds = np.cumsum([0, *steps]).tolist()
    return order, [worker_shares(order[a:b], lengths, world) for a, b in zip(bounds, bounds[1:])]
