"""Read SFT data and normalise every row to (prompt_id, prompt messages, real answer).

Accepted shapes (detected from the columns):
- `messages`: a chat (UltraChat / HF chat); prompt = every message before the final assistant turn, real = that turn.
- `prompt` / `completion` (TRL): strings, or message lists (conversational TRL).
- `real` / `generated` (uclaml/SPIN): `real` is [..., user, assistant]; `generated` is ignored (it is what we make).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from spin_ray.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

BUNDLED = Path(__file__).parent / "assets" / "tasks.parquet"
ROLES = ("system", "user", "assistant")
SHAPES = {"messages": ("messages",), "trl": ("prompt", "completion"), "spin": ("real",)}


class BadRowError(ConfigError):
    """A data row that cannot become a SPIN prompt; names the row and the problem."""


@dataclass
class SFTData:
    rows: list[dict[str, Any]]
    """Normalised rows: prompt_id (str), prompt (list of {role, content}), real (str)."""
    n_input: int
    bad: Counter = field(default_factory=Counter)
    """Skipped rows by reason (only with on_bad_rows="skip")."""

    def to_arrow(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=PROMPT_SCHEMA)


MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
PROMPT_SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.list_(MESSAGE)), ("real", pa.string())])


def prompt_id(prompt: list[dict[str, str]], real: str) -> str:
    """Stable content hash of one pair: the same prompt and answer get the same id in every run and iteration."""
    blob = json.dumps([[(m["role"], m["content"]) for m in prompt], real], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_sft(cfg: DataConfig) -> SFTData:
    """Read `cfg.path`, keep `cfg.split`, normalise; bad rows raise or are skipped and counted."""
    table = read_table(cfg.path, cfg.split)
    return normalize(table.to_pylist(), on_bad_rows=cfg.on_bad_rows, max_rows=cfg.max_rows, source=cfg.path)


def read_table(path: str, split: str | None = "train") -> pa.Table:
    """A pyarrow table from a local file/folder, a save_to_disk folder, an s3:// or gs:// URI, or a hub name."""
    if path == "bundled":
        path = str(BUNDLED)
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
        table = pads.dataset(root, filesystem=fs, format="parquet").to_table()
    elif os.path.exists(path):
        table = _read_local(Path(path), split)
    elif _looks_like_hub_name(path):
        table = _read_hub(path, split)
    else:
        raise ConfigError(f"data.path {path!r} not found: give a parquet/jsonl file or folder, a datasets "
                          "save_to_disk folder, an s3:// or gs:// URI, a hub name, or 'bundled'")
    if split is not None and "split" in table.column_names:
        present = sorted(set(table.column("split").to_pylist()))
        if split not in present:
            raise ConfigError(f"data.split {split!r} not in {path!r}, which has splits {present}; set data.split")
        table = table.filter(pads.field("split") == split)
    return table


def _read_local(path: Path, split: str | None) -> pa.Table:
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        import datasets  # only for save_to_disk folders: it is slow to import

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[_pick_split(list(ds), split, str(path))]
        return ds.data.table
    # Like pyarrow datasets, skip _-/.-prefixed files (markers such as _SUCCESS.json, hidden temp files).
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(("_", "."))) \
        if path.is_dir() else [path]
    tables = [_read_file(p) for p in files if p.suffix in (".parquet", ".jsonl", ".json")]
    if not tables:
        raise ConfigError(f"data.path {str(path)!r} holds no .parquet, .jsonl or .json files")
    return pa.concat_tables(tables, promote_options="default")


def _read_file(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    with open(path) as f:
        text = f.read()
    try:
        records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()
                                                                      if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"data file {str(path)!r} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: {e}")
    if not isinstance(records, list):
        raise ConfigError(f"data file {str(path)!r} must hold a JSON list of records")
    return pa.Table.from_pylist(records)


def _read_hub(name: str, split: str | None) -> pa.Table:
    import datasets

    ds = datasets.load_dataset(name)
    return ds[_pick_split(list(ds), split, name)].data.table


def _pick_split(available: list[str], split: str | None, source: str) -> str:
    if split in available:
        return split
    if split is None and len(available) == 1:
        return available[0]
    raise ConfigError(f"data.split {split!r} not in {source!r}, which has splits {available}; set data.split")


def _looks_like_hub_name(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/")) and " " not in path


def normalize(records: Iterable[dict[str, Any]], *, on_bad_rows: str = "error", max_rows: int | None = None,
              source: str = "data") -> SFTData:
    """Normalise records of one shape; the shape is picked from the first record's keys."""
    records = list(records)
    if not records:
        raise ConfigError(f"{source!r} has no rows (after the split filter); check data.path and data.split")
    shape = _detect_shape(records[0].keys(), source)
    rows, bad, seen = [], Counter(), {}
    for i, record in enumerate(records):
        try:
            prompt, real = _split_pair(record, shape)
            pid = prompt_id(prompt, real)
            if pid in seen:
                raise ValueError(f"duplicate (same prompt and answer as row {seen[pid]})")
        except ValueError as e:
            if on_bad_rows == "error":
                raise BadRowError(f"{source!r} row {i}: {e}. Fix the row, or set data.on_bad_rows=skip to drop "
                                  "such rows (they are counted)") from None
            bad[str(e).split(" (")[0]] += 1  # count by kind, without row numbers
            continue
        seen[pid] = i
        rows.append({"prompt_id": pid, "prompt": prompt, "real": real})
        if max_rows is not None and len(rows) >= max_rows:
            break
    if bad:
        log.warning("skipped %d bad rows of %d in %r: %s", sum(bad.values()), len(records), source, dict(bad))
    if not rows:
        raise ConfigError(f"every row of {source!r} is bad ({dict(bad)}); nothing to train on")
    return SFTData(rows=rows, n_input=len(records), bad=bad)


def _detect_shape(columns: Iterable[str], source: str) -> str:
    columns = set(columns)
    for shape, needed in SHAPES.items():
        if set(needed) <= columns:
            return shape
    raise ConfigError(f"unknown data schema in {source!r}: columns {sorted(columns)}. Expected `messages` (chat), "
                      "`prompt` + `completion` (TRL), or `real` (uclaml/SPIN message lists)")


def _split_pair(record: dict[str, Any], shape: str) -> tuple[list[dict[str, str]], str]:
    if shape == "messages":
        messages = _messages(record["messages"], "messages")
    elif shape == "spin":
        messages = _messages(record["real"], "real")
    else:
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = record["completion"]
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        messages = _messages(prompt, "prompt") + _messages(completion, "completion")
    if messages[-1]["role"] != "assistant":
        raise ValueError("no final assistant turn")
    prompt = messages[:-1]
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError("no user turn before the final assistant turn")
    return prompt, messages[-1]["content"]


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"`{column}` must be a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"`{column}` holds a message without role and content")
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r} in `{column}`")
        if not isinstance(m["content"], str):
            raise ValueError(f"non-string content in `{column}`")
        if not m["content"].strip():
            raise ValueError(f"empty content in `{column}`")
        out.append({"role": m["role"], "content": m["content"]})
    return out
