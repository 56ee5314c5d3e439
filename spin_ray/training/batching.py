"""How a window's pairs become optimizer steps and micro-batches: the steps of an epoch, each step's pairs dealt to
the workers by length, each worker's share cut into micro-batches (by pairs or by a token budget) and evened out
across workers. Pure Python, no Ray or Arrow: the Train workers (spin_ray.stages.train) and the benchmarks share it."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

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


def micro_batches(rows: Sequence[int], lengths: Sequence[int], *, max_pairs: int | None,
                  max_tokens: int | None) -> list[list[int]]:
    """A worker's share split into length-grouped micro-batches of the trainer's layout: the pairs' sequences
    flattened without padding (template.pack_varlen), so a micro-batch costs the sum of its lengths.

    `lengths[i]` is pair i's two sequences' tokens (prompt twice, both answers); `max_pairs` bounds the pairs of a
    micro-batch and `max_tokens` its tokens."""
    out: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in sorted(rows, key=lambda i: lengths[i]):
        full = (max_pairs is not None and len(current) >= max_pairs) or (
            max_tokens is not None and tokens + lengths[i] > max_tokens)
        if current and full:
            out.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    return out + ([current] if current else [])


def even_out(plans: list[list[list[int]]]) -> list[list[list[int]]]:
    """Every worker's micro-batches, the larger ones split until all workers run the same number: each FSDP2
    forward all-gathers across workers, so one worker with an extra micro-batch would wait forever."""
    n = max(map(len, plans))
    for plan in plans:
        while len(plan) < n:  # each share has as many pairs as the largest plan's micro-batches, so this ends
            j = max(range(len(plan)), key=lambda k: len(plan[k]))
            half = len(plan[j]) // 2
            plan[j:j + 1] = [plan[j][:half], plan[j][half:]]
    return plans


def even_micro_batches(shares: list[list[int]], lengths: Sequence[int], *, max_pairs: int | None,
                       max_tokens: int | None) -> list[list[list[int]]]:
    """Each worker's share cut into micro-batches, the same number for every worker (even_out)."""
    return even_out([micro_batches(share, lengths, max_pairs=max_pairs, max_tokens=max_tokens) for share in shares])


def epoch_plan(lengths: Sequence[int], steps: Sequence[int], seed: int, epoch: int,
               world: int) -> tuple[list[int], list[list[list[int]]]]:
    """One epoch's seeded order of the rows and, per optimizer step, each worker's share of its global batch."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    bounds = np.cumsum([0, *steps]).tolist()
    return order, [worker_shares(order[a:b], lengths, world) for a, b in zip(bounds, bounds[1:])]
