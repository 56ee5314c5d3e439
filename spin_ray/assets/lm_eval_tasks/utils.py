"""spin_ray's bundled held-out prompts as an lm-eval dataset, for the tasks in this folder (`--include_path`).

The rows are the ones `spin_ray.stages.evaluate` scores with data.path = bundled: the `split` rows (eval.split, `test`) of
spin_ray/assets/tasks.parquet, normalised by spin_ray.data, in the same order, so lm-eval's `--limit N` takes the same
prompts as eval.rows = N. Each prompt is a system turn (empty when it has none: lm-eval then sends none) and one user
turn; `answer` is the reference, and `target` the reference as the trainer scores it, followed by the EOS text.
Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import datasets


def heldout(split: str = "test", eos: str = "<|im_end|>", **_: Any) -> dict[str, datasets.Dataset]:
    """lm-eval's `custom_dataset`: called with the task's metadata (`--metadata '{"eos": "</s>"}'` for a model whose
    EOS is not ChatML's); the other metadata keys (version, ...) are lm-eval's own."""
    from spin_ray.config import DataConfig
    from spin_ray.data.sources import load_sft

    rows = []
    for row in load_sft(DataConfig(path="bundled", split=split)).rows:
        *system, user = row["prompt"]
        if user["role"] != "user" or [m["role"] for m in system] not in ([], ["system"]):
            raise ValueError(f"bundled prompt {row['prompt_id']} is not [system,] user: {row['prompt']}")
        rows.append({"prompt_id": row["prompt_id"], "system": system[0]["content"] if system else "",
                     "question": user["content"], "answer": row["real"], "target": row["real"] + eos})
    return {"test": datasets.Dataset.from_list(rows)}
