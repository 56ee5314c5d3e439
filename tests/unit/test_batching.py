"""How the trainer forms its batches (length-grouped, token budget, even across workers) and which β/lr it uses;
and the padded baseline's batches the benchmarks time it against (benchmarks/baselines.py)."""

import os
import sys

import numpy as np
import pyarrow as pa
import pytest

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.stages.train import PairArrays
from spin_ray.training.batching import even_micro_batches, micro_batches, worker_shares

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from baselines import even_padded_micro_batches, padded_micro_batches  # noqa: E402


def test_micro_batches_group_by_length_under_a_pair_cap():
    lengths = [50, 10, 40, 12, 11, 45]
    assert micro_batches(range(6), lengths, max_pairs=2, max_tokens=None) == [[1, 4], [3, 2], [5, 0]]


def test_token_budget_counts_padding_of_the_packed_rows():
    lengths = [10, 10, 10, 30, 100]
    # Lengths are packed rows (both sequences): 3 x 10 = 30 <= 100; adding the 30 costs 4 x 30 = 120 > 100; then
    # 2 x 100 > 100, so the 100 goes alone.
    assert padded_micro_batches(range(5), lengths, max_pairs=None, max_tokens=100) == [[0, 1, 2], [3], [4]]


def test_token_budget_also_caps_the_padding_share():
    lengths = [10, 10, 11, 20, 21]
    # Budget 1000 fits all five, but with the 20: 4 x 20 = 80 tokens for 51 real, 36% padding > MAX_PADDING (10%);
    # [10, 10, 11] pads 2 of 33 (6%), [20, 21] 1 of 42 (2%).
    assert padded_micro_batches(range(5), lengths, max_pairs=None, max_tokens=1000) == [[0, 1, 2], [3, 4]]
    # A pair cap alone keeps its fixed count (the padding cap is part of the token budget).
    assert padded_micro_batches(range(5), lengths, max_pairs=5, max_tokens=None) == [[0, 1, 2, 3, 4]]


def test_workers_get_equal_shares_and_the_same_number_of_micro_batches():
    lengths = [5, 100, 6, 7, 8, 9, 101, 102]
    shares = worker_shares(range(8), lengths, 2)
    assert shares == [[0, 3, 5, 6], [2, 4, 1, 7]] and sorted(sum(shares, [])) == list(range(8))
    plans = even_micro_batches([[0, 2, 3, 4], [1, 5, 6, 7]], lengths, max_pairs=None, max_tokens=150)
    # The trainer's flattened layout: worker 0 fits in one forward (5 + 6 + 7 + 8 = 26); worker 1 needs three
    # ([5, 1]: 9 + 100 = 109, then 6 and 7 alone: 109 + 101 > 150), so worker 0's forward is split into three too.
    assert plans == [[[0], [2], [3, 4]], [[5, 1], [6], [7]]]
    # Padded rows: worker 1 needs four ([5] then 1, 6, 7 alone: 2 x 100 > 150), and so does worker 0.
    assert even_padded_micro_batches([[0, 2, 3, 4], [1, 5, 6, 7]], lengths, max_pairs=None, max_tokens=150) == [[[0], [2], [3], [4]], [[5], [1], [6], [7]]]


def test_pair_arrays_hold_ids_and_lengths():
    table = pa.table({"prompt_ids": [[1, 2, 3], [4]], "real_ids": [[5], [6, 7, 8, 9]], "generated_ids": [[1, 1], [2]]})
    pairs = PairArrays(table)
    assert len(pairs) == 2 and pairs.lengths == [2 * 3 + 1 + 2, 2 * 1 + 4 + 1]  # packed rows: prompt twice
    assert pairs.pair(1) == {"prompt_ids": [4], "real_ids": [6, 7, 8, 9], "generated_ids": [2]}
    sliced = PairArrays(table.slice(1))  # a slice's offsets do not start at 0
    assert sliced.lengths == [7] and sliced.pair(0) == pairs.pair(1)
    # The reference log-probs come from the whole table's array, by whole-table row.
    ref = np.array([[-1.0, -3.0], [-2.0, -4.0]])
    assert pairs.micro_batch([1], ref) == [{**pairs.pair(1), "ref_logp_real": -2.0, "ref_logp_generated": -4.0}]
    assert pairs.micro_batch([0]) == [pairs.pair(0)]


def test_iteration_beta_and_lr_resolve_in_one_place():
    cfg = SpinConfig.load(None, ["train.beta_per_iteration=[0.1, 0.1, 0.1, 5.0]",
                                 "train.lr_per_iteration=[5e-7, 5e-7, 1e-7]", "iteration=3"])
    t3 = cfg.for_iteration(cfg.iteration)
    assert (t3.train.beta, t3.train.lr) == (5.0, 1e-7)  # past the lr list's end: its last value
    assert t3.for_iteration(3) == t3 and cfg.train.beta == 0.1  # idempotent, the input left alone
    assert cfg.for_iteration(0).train.beta == 0.1 and SpinConfig().for_iteration(2).train.beta == 0.1


def test_batching_fields_are_validated():
    with pytest.raises(ConfigError, match=r"train.micro_batch_tokens = 100: must be null or >= 2 x data.max_length"):
        SpinConfig.load(None, ["train.micro_batch_tokens=100"])
    with pytest.raises(ConfigError, match="train.hsdp_shard_size = 3"):
        SpinConfig.load(None, ["train.strategy=fsdp", "train.num_workers=4", "train.micro_batch_size=4",
                               "train.hsdp_shard_size=3"])


def test_padding_cap_is_a_parameter():
    lengths = [10, 10, 11, 20, 21]
    # Without the cap (1.0: any padding), a budget of 1000 takes the whole share in one forward, padded to 21.
    assert padded_micro_batches(range(5), lengths, max_pairs=None, max_tokens=1000,
                                max_padding=1.0) == [[0, 1, 2, 3, 4]]
    assert even_padded_micro_batches([list(range(5))], lengths, max_pairs=None, max_tokens=1000,
                                     max_padding=0.05) == [[[0, 1], [2], [3, 4]]]


def test_flattened_micro_batches_cost_their_real_tokens():
    lengths = [10, 10, 11, 20, 21]
    # Flattened (template.pack_varlen, the trainer's layout): a micro-batch costs the sum of its
    # lengths, no padding: 10+10+11+20 = 51 <= 60.
    assert micro_batches(range(5), lengths, max_pairs=None, max_tokens=60) == [[0, 1, 2, 3], [4]]
    # Padded rows: 4 x 20 = 80 > 60, and [20, 21] pads too little to split.
    assert padded_micro_batches(range(5), lengths, max_pairs=None, max_tokens=60) == [[0, 1, 2], [3, 4]]
