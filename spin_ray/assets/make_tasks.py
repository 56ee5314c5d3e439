"""Bundled toy SFT data: short tasks whose answers can be checked exactly.

Run ``python -m spin_ray.assets.make_tasks`` to (re)write ``tasks.parquet`` next to this file.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TASKS_PATH = Path(__file__).with_name("tasks.parquet")
SYSTEM_PROMPT = "You are a precise assistant."
N_TRAIN = 3000
N_TEST = 200
SYSTEM_FRACTION = 0.2

# One regex per task; check_answer and the generator share them so the prompt wording cannot drift.
_REVERSE = re.compile(r"Reverse the letters: ([a-z]+)")
_SORT = re.compile(r"Sort the letters alphabetically: ([a-z]+)")
_ADD = re.compile(r"Add the numbers: (\d+) \+ (\d+)")
_COUNT = re.compile(r"Count the letters: ([a-z]+)")

_SOLVERS: list[tuple[re.Pattern[str], Callable[..., str]]] = [
    (_REVERSE, lambda w: w[::-1]),
    (_SORT, lambda w: "".join(sorted(w))),
    (_ADD, lambda a, b: str(int(a) + int(b))),
    (_COUNT, lambda w: str(len(w))),
]


KINDS = ("reverse", "sort", "add", "count")


def solve(user_prompt: str) -> str:
    """The correct answer to a bundled task prompt."""
    for pattern, solver in _SOLVERS:
        m = pattern.fullmatch(user_prompt.strip())
        if m:
            return solver(*m.groups())
    raise ValueError(f"not a bundled task prompt: {user_prompt!r}")


def task_kind(user_prompt: str) -> str:
    """reverse, sort, add or count."""
    for (pattern, _), kind in zip(_SOLVERS, KINDS):
        if pattern.fullmatch(user_prompt.strip()):
            return kind
    raise ValueError(f"not a bundled task prompt: {user_prompt!r}")


def check_answer(user_prompt: str, answer: str) -> bool:
    """Exact match (ignoring surrounding whitespace) of a model answer against the recomputed solution."""
    return answer.strip() == solve(user_prompt)


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7)))


def _prompt(kind: int, rng: random.Random) -> str:
    if kind == 0:
        return f"Reverse the letters: {_word(rng)}"
    if kind == 1:
        return f"Sort the letters alphabetically: {_word(rng)}"
    if kind == 2:
        return f"Add the numbers: {rng.randint(0, 99)} + {rng.randint(0, 99)}"
    return f"Count the letters: {_word(rng)}"


def make_tasks(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> pa.Table:
    """Rows of ``messages`` (HF chat format) and ``split``; task kinds cycle so every split is evenly mixed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    messages, splits = [], []
    for i in range(n_train + n_test):
        # Unique prompts keep the test split disjoint from train.
        prompt = _prompt(i % len(_SOLVERS), rng)
        while prompt in seen:
            prompt = _prompt(i % len(_SOLVERS), rng)
        seen.add(prompt)
        conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": solve(prompt)}]
        if rng.random() < SYSTEM_FRACTION:
            conv.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        messages.append(conv)
        splits.append("train" if i < n_train else "test")
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.table({"messages": pa.array(messages, type=msg_type), "split": pa.array(splits, type=pa.string())})


def write_tasks(path: str | os.PathLike = TASKS_PATH, seed: int = 0) -> Path:
    """Write the task table to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(make_tasks(seed), tmp, compression="zstd")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the asset must be readable like any package file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(TASKS_PATH))
    args = parser.parse_args(argv)
    print(write_tasks(args.out, args.seed))


if __name__ == "__main__":
    main()
