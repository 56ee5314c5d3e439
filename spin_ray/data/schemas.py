"""The records' shapes, in one place: every stage that reads or writes prompts, pairs or reference log-probs imports
them from here."""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
PROMPT_SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.list_(MESSAGE)), ("real", pa.string())])
"""A normalised SFT row: its content hash, the prompt's messages and the human answer."""

IDS = ("prompt_ids", "real_ids", "generated_ids")
"""Token ids of a pair after the one truncation rule (template.encode_pair), as trained on."""
PAIRS_COLUMNS = ("prompt_id", "prompt", "real", "generated", "prompt_ids", "real_ids", "generated_ids", "iteration",
                 "finish_reason", "generated_tokens")
"""One SPIN pair per prompt, as `iter_<t>/pairs/` holds it."""
TOKENS = "pair_tokens"
"""A pair's tokens in a training micro-batch, the prompt twice and both answers (train.packed_lengths): written with
the pairs so that the trainer's driver plans batches from this column alone, never reading the token ids."""
LOGPS = ("ref_logp_real", "ref_logp_generated")
"""θ_t's summed log-probs of the real and the generated answer: the reference of iteration t."""
REFERENCE_COLUMNS = ("iteration", "prompt_id", *LOGPS)
"""`iter_<t>/reference/`: θ_t's log-probs of each pair of iteration t's window (the pair's own iteration and prompt),
in the order the trainer reads the window (train.py)."""
