"""Read SFT data and normalise every row to (prompt_id, prompt messages, real answer).

Accepted shapes (detected from the columns):
- `messages`: a chat (UltraChat / HF chat); prompt = every message before the final assistant turn, real = that turn.
- `prompt` / `completion` (TRL): strings, or message lists (conversational TRL).
- `real` / `generated` (uclaml/SPIN): `real` is [..., user, assistant]; `generated` is ignored (it is what we make).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from spin_ray.assets import ASSETS
from spin_ray.config import ConfigError, DataConfig, decode_utf8
from spin_ray.data.schemas import PROMPT_SCHEMA
from spin_ray.models.loading import looks_like_hub_id

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

BUNDLED = ASSETS / "tasks.parquet"
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
    duplicates: int = 0
    """Rows dropped for repeating an earlier row's prompt and answer (data.duplicates="drop")."""

    def to_arrow(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=PROMPT_SCHEMA)


SUFFIXES = (".parquet", ".jsonl", ".json")


def prompt_id(prompt: list[dict[str, str]], real: str) -> str:
    """Stable content hash of one pair: the same prompt and answer get the same id in every run and iteration."""
    blob = json.dumps([[(m["role"], m["content"]) for m in prompt], real], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_sft(cfg: DataConfig) -> SFTData:
    """Read `cfg.path` into the driver, keep `cfg.split`, normalise: bad rows raise or are skipped and counted
    (data.on_bad_rows), repeated pairs are dropped and counted or raise (data.duplicates). For small data (the bundled
    tasks, tests); the stages read through prepare.py, which keeps the rows out of the driver."""
    records, where = read_records(cfg.path, cfg.split)
    return normalize(records, on_bad_rows=cfg.on_bad_rows, duplicates=cfg.duplicates, max_rows=cfg.max_rows,
                     source=cfg.path, where=where)


def read_records(path: str, split: str | None = "train") -> tuple[list[Any], list[str]]:
    """The rows of a local file/folder, a save_to_disk folder, an s3:// or gs:// URI, or a hub name, as Python
    objects (so that a row of the wrong type is a bad row, not an Arrow error), each with where it came from."""
    if path == "bundled":
        path = str(BUNDLED)
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
        parts = [(path, _arrow(lambda: pads.dataset(root, filesystem=fs, format="parquet").to_table(), path), None)]
    elif os.path.exists(path):
        parts = _read_local(Path(path), split)
    elif looks_like_hub_id(path):
        parts = [(path, load_hub(path, split).to_list(), None)]
    else:
        raise not_found(path)
    _one_shape(parts)
    records, where = [], []
    for source, rows, lines in parts:
        records.extend(rows)
        labels = [f"line {n}" for n in lines] if lines is not None else [f"row {i}" for i in range(len(rows))]
        where.extend(f"{source!r} {label}" for label in labels)
    if split is not None and any(isinstance(r, dict) and "split" in r for r in records):
        present = {r.get("split") for r in records if isinstance(r, dict)}
        if split not in present:
            raise no_split(split, sorted(str(s) for s in present if s is not None), path)
        keep = [i for i, r in enumerate(records) if isinstance(r, dict) and r.get("split") == split]
        records, where = [records[i] for i in keep], [where[i] for i in keep]
    return records, where


def _one_shape(parts: list[tuple[str, list[Any], list[int] | None]]) -> None:
    """Files of one folder must share a shape: mixing them is almost always two datasets put together by mistake."""
    shapes: dict[str, str] = {}
    for source, rows, _ in parts:
        first = next((r for r in rows if isinstance(r, dict)), None)
        if first is not None:
            shapes.setdefault(detect_shape(first.keys(), source), source)
    if len(shapes) > 1:
        raise mixed_shapes(shapes)


def not_found(path: str) -> ConfigError:
    return ConfigError(f"data.path {path!r} not found (relative to {os.getcwd()}): give a parquet/jsonl file or "
                       "folder, a datasets save_to_disk folder, an s3:// or gs:// URI, a hub name (org/name), or "
                       "'bundled'")


def mixed_shapes(shapes: dict[str, str]) -> ConfigError:
    """`shapes`: shape -> the first file of that shape, in file order."""
    (a, fa), (b, fb) = list(shapes.items())[:2]
    return ConfigError(f"data files of different shapes under data.path: {fa!r} is {_SHAPE_NAMES[a]}, {fb!r} is "
                       f"{_SHAPE_NAMES[b]}. Keep one shape per folder (convert one of them, or point data.path at "
                       "one file)")


def unreadable_parquet(source: str, e: Exception) -> ConfigError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ConfigError(f"data file {source!r} is not a readable parquet file ({type(e).__name__}: {first}); "
                       "re-export it, or move it out of data.path")


def _arrow(read: Callable[[], pa.Table], source: str) -> list[dict[str, Any]]:
    try:
        return read().to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise unreadable_parquet(source, e) from None


def _read_local(path: Path, split: str | None) -> list[tuple[str, list[Any], list[int] | None]]:
    """(file, its records, the jsonl line number of each record or None) per data file under `path`."""
    if is_saved_dataset(path):
        return [(str(path), load_saved(path, split).to_list(), None)]
    return [(str(p), *read_file(p)) for p in data_files(path)]


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def load_saved(path: Path, split: str | None) -> "datasets.Dataset":
    """A `save_to_disk` folder's split, memory-mapped (its rows are not read)."""
    import datasets  # only for save_to_disk folders: it is slow to import

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[pick_split(list(ds), split, str(path))]
    return ds


def data_files(path: Path) -> list[Path]:
    """The data files of a local file or folder, in the order their rows count (sorted names)."""
    if path.is_file() and path.suffix not in SUFFIXES:
        raise ConfigError(f"data file {str(path)!r} is not .parquet, .jsonl or .json; convert it to one of those")
    # Like pyarrow datasets, skip _-/.-prefixed files (markers such as _SUCCESS.json, hidden temp files).
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(("_", "."))) \
        if path.is_dir() else [path]
    files = [p for p in files if p.suffix in SUFFIXES]
    if not files:
        raise ConfigError(f"data.path {str(path)!r} holds no .parquet, .jsonl or .json files")
    return files


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) of each non-empty line, streamed; a line that is not UTF-8 or not JSON is an error
    naming it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = decode_utf8(raw, f"data file {str(path)!r}", first_line=n)
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data file {str(path)!r} is not valid JSONL: line {n}: {e}; fix that line (one "
                                  "JSON object per line)") from None


def read_file(path: Path) -> tuple[list[Any], list[int] | None]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return _arrow(lambda: pq.read_table(path), str(path)), None
    if path.suffix == ".json":
        text = decode_utf8(path.read_bytes(), f"data file {str(path)!r}")
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data file {str(path)!r} is not valid JSON: {e}; fix it there") from None
        if not isinstance(records, list):
            raise ConfigError(f"data file {str(path)!r} must hold a JSON list of records")
        return records, None
    numbered = list(iter_jsonl(path))
    return [r for _, r in numbered], [n for n, _ in numbered]


def load_hub(name: str, split: str | None) -> "datasets.Dataset":
    """A hub dataset's split, downloaded to the HF cache and memory-mapped (its rows are not read)."""
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-name errors all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"data.path {name!r} is not a local file or folder (nothing at {os.path.abspath(name)}) "
                          f"and loading it as a hub dataset failed ({type(e).__name__}: {first}); fix the path, or "
                          "the dataset name, network or HF token") from None
    return ds[pick_split(list(ds), split, name)]


def pick_split(available: list[str], split: str | None, source: str) -> str:
    if split in available:
        return split
    if split is None and len(available) == 1:
        return available[0]
    raise no_split(split, available, source)


def no_split(split: str | None, available: list[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(str(split), available, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"data.split {split!r} not in {source!r}, which has splits {available}; set data.split{hint}")


def normalize(records: Iterable[Any], *, on_bad_rows: str = "error", duplicates: str = "drop",
              max_rows: int | None = None, source: str = "data", where: list[str] | None = None) -> SFTData:
    """Normalise records of one shape; the shape is picked from the first record's keys. `where[i]` names record i
    in errors (default: its row number in `source`)."""
    records = list(records)
    if not records:
        raise ConfigError(f"{source!r} has no rows (after the split filter); check data.path and data.split")
    first = next((r for r in records if isinstance(r, dict)), None)
    if first is None:
        raise ConfigError(f"{source!r} holds no records (JSON objects / table rows); check data.path")
    shape = detect_shape(first.keys(), source)
    rows, bad, seen, dropped = [], Counter(), {}, 0
    for i, record in enumerate(records):
        at = where[i] if where is not None else f"{source!r} row {i}"
        try:
            prompt, real = split_pair(record, shape)
        except ValueError as e:
            if on_bad_rows == "error":
                raise bad_row(at, e) from None
            bad[bad_kind(e)] += 1
            continue
        pid = prompt_id(prompt, real)
        if pid in seen:
            if duplicates == "error":
                raise repeated_row(at, seen[pid])
            dropped += 1
            continue
        seen[pid] = at
        rows.append({"prompt_id": pid, "prompt": prompt, "real": real})
        if max_rows is not None and len(rows) >= max_rows:
            break
    report_dropped(source, len(records), bad, dropped)
    if not rows:
        raise all_bad(source, bad)
    return SFTData(rows=rows, n_input=len(records), bad=bad, duplicates=dropped)


def bad_kind(e: ValueError) -> str:
    """A bad row's problem without the values, to count rows by kind."""
    return str(e).split(" (")[0]


def bad_row(at: str, e: ValueError) -> BadRowError:
    return BadRowError(f"{at}: {e}. Fix the row, or set data.on_bad_rows=skip to drop such rows (they are counted)")


def repeated_row(at: str, first: str) -> BadRowError:
    return BadRowError(f"{at} repeats {first} (same prompt and answer). Remove the repeat, or set "
                       "data.duplicates=drop to keep the first of each (the count is reported)")


def all_bad(source: str, bad: Counter) -> ConfigError:
    return ConfigError(f"every row of {source!r} is bad ({dict(bad)}); nothing to train on")


def report_dropped(source: str, n_input: int, bad: Counter, dropped: int) -> None:
    if dropped:
        log.warning("dropped %d duplicate rows of %d in %r (same prompt and answer as an earlier row; "
                    "data.duplicates=error stops at them instead)", dropped, n_input, source)
    if bad:
        log.warning("skipped %d bad rows of %d in %r: %s", sum(bad.values()), n_input, source, dict(bad))


_SHAPE_NAMES = {"messages": "chat (`messages`)", "trl": "TRL (`prompt` + `completion`)",
                "spin": "uclaml/SPIN (`real` + `generated`)"}


def detect_shape(columns: Iterable[str], source: str) -> str:
    columns = set(columns)
    for shape, needed in SHAPES.items():
        if set(needed) <= columns:
            return shape
    raise ConfigError(f"unknown data schema in {source!r}: columns {sorted(columns)}. Expected `messages` (chat), "
                      "`prompt` + `completion` (TRL), or `real` (uclaml/SPIN message lists)")


def split_pair(record: Any, shape: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(record, dict):
        raise ValueError(f"not a record but {_kind(record)}")
    missing = [c for c in SHAPES[shape] if c not in record]
    if missing:
        raise ValueError(f"no `{missing[0]}` (the first row is {_SHAPE_NAMES[shape]})")
    if shape == "messages":
        messages = _messages(record["messages"], "messages")
    elif shape == "spin":
        messages = _messages(record["real"], "real")
    else:
        # Either may be a string or a message list (conversational TRL), row by row.
        prompt, completion = record["prompt"], record["completion"]
        for column, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, (str, list, tuple)):
                raise ValueError(f"`{column}` is {_kind(value)}; it must be a string or a list of messages")
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
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
            raise ValueError(f"non-string content in `{column}`: {_kind(m['content'])}")
        if not m["content"].strip():
            raise ValueError(f"empty content in `{column}`")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _kind(value: Any) -> str:
    """What a JSON value is, in the user's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")
