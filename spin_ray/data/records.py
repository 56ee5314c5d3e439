"""How records are stored and written: atomically, so a crash never leaves half a stage behind. Where each record
lives, and when a stage's output counts as complete, is layout.py's (RunLayout).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from spin_ray.config import ConfigError
from spin_ray.data.schemas import PAIRS_COLUMNS

MARKER = "_SUCCESS.json"


def absolute(storage: str) -> str:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    return storage if "://" in storage else os.path.abspath(storage)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_complete(uri: str) -> bool:
    """A folder of records is complete once its marker is written (the marker is always written last); stages ask
    RunLayout.done, which applies this to folders."""
    return exists(join(uri, MARKER))


def marker(uri: str) -> dict[str, Any]:
    """A complete records folder's marker: what its writer recorded (rows, the model's final metrics, ...)."""
    return read_json(join(uri, MARKER))


def read_json(uri: str) -> Any:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def read_lines(uri: str) -> list[str]:
    """The non-empty lines of a text file (train_metrics.jsonl); none if it does not exist yet."""
    if not exists(uri):
        return []
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return [line for line in f.read().decode().splitlines() if line.strip()]


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write to a temp name beside `uri`, then rename (object stores put whole objects: no rename needed)."""
    fs, path = filesystem(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = path if "://" in uri else f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    if tmp != path:
        fs.move(tmp, path)


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def _begin(dest: str) -> tuple[pafs.FileSystem, str, str]:
    """Where a records folder is written before it is complete: locally a temp folder beside `dest` (leftovers of an
    interrupted write removed), renamed into place by `_finish`; on object stores `dest` itself, cleared first."""
    fs, path = filesystem(dest)
    if not isinstance(fs, pafs.LocalFileSystem):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
        return fs, path, path
    for stale in fs.get_file_info(pafs.FileSelector(os.path.dirname(path), allow_not_found=True)):
        if stale.base_name.startswith(os.path.basename(path) + ".tmp-"):
            fs.delete_dir(stale.path)
    return fs, path, f"{path}.tmp-{uuid.uuid4().hex[:8]}"


def _finish(fs: pafs.FileSystem, path: str, work: str, stats: dict[str, Any]) -> None:
    """The marker, last, then (locally) the rename that makes the folder complete in one step."""
    with fs.open_output_stream(join(work, MARKER)) as f:
        f.write(json.dumps(stats).encode())
    if work != path:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
        fs.move(work, path)


def write_pairs(ds: "ray.data.Dataset", dest: str, *, expected_rows: int) -> dict[str, Any]:
    """Run the pipeline into `dest` and check that every prompt is there exactly once; the marker, holding the row
    count, is written last (`_begin`, `_finish`).

    The pairs' ids come from the `expected_rows` distinct prompts, so equal counts of rows, distinct ids and prompts
    mean exactly once; Ray tasks count them (count_ids), the driver never holds the ids.
    """
    fs, path, work = _begin(dest)
    ds.write_parquet(work if "://" not in dest else dest)
    rows, distinct = count_ids(dest if work == path else work, expected_rows)
    if rows != distinct or distinct != expected_rows:
        raise RuntimeError(f"pairs written to {dest} do not match the prompts: {expected_rows - distinct} missing, "
                           f"{rows - distinct} duplicated")
    stats = {"rows": rows}
    _finish(fs, path, work, stats)
    return stats


def write_dataset(ds: "ray.data.Dataset", dest: str) -> int:
    """A caller's Dataset of records written to `dest` as it streams (marker last, as write_pairs); its row count."""
    fs, path, work = _begin(dest)
    ds.write_parquet(work if "://" not in dest else dest)
    rows = pads.dataset(work, filesystem=fs, format="parquet").count_rows()
    _finish(fs, path, work, {"rows": rows})
    return rows


IDS_PER_TASK = 2_000_000
"""Distinct ids one counting task holds (a few hundred MB of Python strings)."""


def id_part(prompt_id: str, parts: int) -> int:
    """A prompt id's hash partition, the same in every process (Python's own str hash is salted per process)."""
    return int.from_bytes(prompt_id.encode()[-8:], "little") % parts


def _count_part(uri: str, part: int, parts: int) -> tuple[int, int]:
    fs, path = filesystem(uri)
    rows, seen = 0, set()
    for batch in pads.dataset(path, filesystem=fs, format="parquet").to_batches(columns=["prompt_id"]):
        ids = batch.column(0).to_pylist()
        ids = [i for i in ids if id_part(i, parts) == part] if parts > 1 else ids
        rows += len(ids)
        seen.update(ids)
    return rows, len(seen)


def count_ids(uri: str, expected_rows: int) -> tuple[int, int]:
    """(rows, distinct prompt ids) of the parquet folder `uri`, counted by one Ray task per hash partition of
    IDS_PER_TASK ids. num_cpus=0: warm generation engines may hold every CPU."""
    import ray

    parts = max(1, -(-expected_rows // IDS_PER_TASK))
    task = ray.remote(num_cpus=0)(_count_part)
    counts = ray.get([task.remote(uri, part, parts) for part in range(parts)])
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def write_table(dest: str, table: pa.Table, stats: dict[str, Any]) -> None:
    """`table` as one parquet file in the records folder `dest`, complete once its marker (`stats`) is written."""
    import pyarrow.parquet as pq

    fs, path, work = _begin(dest)
    fs.create_dir(work, recursive=True)
    pq.write_table(table, join(work, "part-0.parquet"), filesystem=fs)
    _finish(fs, path, work, stats)


def read_table(uri: str) -> pa.Table:
    """A complete records folder's parquet files as one table."""
    fs, path = filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True).to_table()


def pairs_files(uri: str, columns: list[str] | None = None) -> list[str]:
    """A complete pairs folder's parquet files (URIs, by name); an unfinished folder or a missing column is an error
    naming it."""
    import pyarrow.parquet as pq

    if not is_complete(uri):
        raise ConfigError(f"no finished pairs at {uri}: `spin-ray generate --set iteration=<t>` writes "
                          "iter_<t>/pairs; run it for that iteration, with the same storage, first")
    fs, path = filesystem(uri)
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.endswith(".parquet"))
    files = [join(uri, name) for name in names]
    for name in names:
        stored = pq.read_schema(join(path, name), filesystem=fs).names
        missing = [c for c in (columns or PAIRS_COLUMNS) if c not in stored]
        if missing:
            raise ConfigError(f"pairs at {uri} lack column(s) {missing}; regenerate them with `spin-ray generate`")
    return files
