"""Prepare: SFT data → normalised, de-duplicated prompts, written once to `<storage>/prompts/` (parquet, then
`_SUCCESS.json` last); the held-out split to `<storage>/prompts_eval/`.

The first stage of `generate` and `run`, and `spin-ray prepare`; CPU only, so bad data is refused before any GPU
work. Ray Data carries the rows: one task per data file streams it in chunks and normalises each row with sources.py's
rules (bad rows are counted or reported, never shipped on); the good rows are hash-partitioned on prompt_id, so each
exact repeat meets its first occurrence in one task; the kept rows are written as they come. The driver gets only
summaries from a small actor (per file: shape, split names, counts, the earliest bad row; per partition: duplicates;
per block: a digest), so its memory does not grow with the data. Every iteration then streams its prompts from the
folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Union

import pyarrow as pa
import pyarrow.fs as pafs

from spin_ray.data import sources

from spin_ray.config import ConfigError, DataConfig, SpinConfig
from spin_ray.data import records
from spin_ray.data.layout import RunLayout
from spin_ray.data.manifest import block_digest, fingerprint
from spin_ray.data.schemas import PROMPT_SCHEMA
from spin_ray.logs import QUIET_DATA, quiet, quiet_ray_data

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

CHUNK = 4096
"""Rows a read task normalises and ships at a time: bounds its memory whatever a file's size."""
PARTITION_BYTES = 256 << 20
"""Input bytes per duplicate-finding partition (each is sorted in one task)."""
ROW = pa.schema([*PROMPT_SCHEMA, ("file", pa.int32()), ("at", pa.int64()), ("part", pa.int32())])
"""A normalised row on its way: its place in the data (file index; jsonl line or row number, which order the
repeats) and its hash partition."""
DATASET = "the given Dataset"


@dataclass(frozen=True)
class Part:
    """One data file: where workers read it, how, and how errors name it (as the user spelled the path)."""

    uri: str
    kind: str  # jsonl, json, parquet or arrow (a datasets cache / save_to_disk shard)
    label: str
    size: int
    mtime_ns: int

    def where(self, at: int) -> str:
        return f"{self.label!r} {'line' if self.kind == 'jsonl' else 'row'} {at}"


@dataclass
class Prepared:
    """A finished prompts folder."""

    path: str
    rows: int
    fingerprint: str
    """The prompts' identity (manifest.fingerprint of per-block digests): changes when any prompt does."""
    bad: dict[str, int] = field(default_factory=dict)
    """Skipped rows by kind (data.on_bad_rows=skip)."""
    duplicates: int = 0
    skipped: bool = False
    """True when a finished folder from the same data was reused."""
    seconds: float = 0.0

    def dataset(self, rows_per_block: int | None = None) -> "ray.data.Dataset":
        """The prompts, streamed from the folder; with `rows_per_block`, in blocks of at most that many rows (the
        parquet reader merges a small folder into one block, which would feed a single generation engine)."""
        import ray.data

        ds = quiet(ray.data.read_parquet(self.path, file_extensions=["parquet"], schema=PROMPT_SCHEMA)).select_columns(
            PROMPT_SCHEMA.names)
        return ds if rows_per_block is None else ds.repartition(target_num_rows_per_block=rows_per_block)

    def table(self) -> pa.Table:
        """All rows in the driver, in prompt-id order: only for small sets (the held-out prompts)."""
        import pyarrow.dataset as pads

        fs, path = records.filesystem(self.path)
        table = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True).to_table()
        return table.select(PROMPT_SCHEMA.names).cast(PROMPT_SCHEMA).sort_by("prompt_id")

    def summary(self) -> dict[str, Any]:
        return {"prompts": self.path, "rows": self.rows, "fingerprint": self.fingerprint, "bad_rows": self.bad,
                "duplicates": self.duplicates, "skipped": self.skipped, "seconds": round(self.seconds, 2)}


Source = Union["ray.data.Dataset", pa.Table, None]


@quiet_ray_data
def prepare(cfg: SpinConfig, prompts: Source = None, *, heldout: bool = False, say_reused: bool = True) -> Prepared:
    """`<storage>/prompts` from `cfg.data` (None) or a Ray Dataset / pyarrow table of SFT rows in any accepted shape
    (an already normalised one is taken as it is); `heldout`: `<storage>/prompts_eval` from cfg.data's eval split.
    A finished folder made from the same files and data settings is reused (said unless `say_reused` is False: a
    stage reading what its run prepared at the start); a Dataset is always prepared again (it has no identity to
    compare). Needs Ray."""
    dcfg = data_config(cfg, heldout)
    layout = RunLayout(cfg.storage)
    dest = layout.prompts_eval if heldout else layout.prompts
    start = time.perf_counter()
    if prompts is None:
        parts = data_parts(dcfg)
        settings = {k: getattr(dcfg, k) for k in ("path", "split", "on_bad_rows", "duplicates", "max_rows")}
        source = json.loads(json.dumps({"data": settings, "files": [(p.label, p.size, p.mtime_ns) for p in parts]}))
        if layout.done(dest):
            marker = records.marker(dest)
            if marker.get("source") == source:
                if say_reused:
                    log.info("prompts already at %s (%d rows, same data); reusing them", dest, marker["rows"])
                return _from_marker(dest, marker, skipped=True)
    else:
        parts, source = [], None
    with _data_settings(prompts):
        prepared = _write(dest, lambda tally: _pipeline(dcfg, parts, prompts, tally), dcfg, parts, source)
    prepared.seconds = time.perf_counter() - start
    log.info("prepared %d prompts at %s in %.1f s", prepared.rows, dest, prepared.seconds)
    return prepared


@contextlib.contextmanager
def _data_settings(prompts: Source) -> Iterator[None]:
    """The dedup's shuffle runs as tasks, not the hash shuffle's aggregator actors: those take seconds to start (a
    long wait for small data), and their reduce fails on a caller's Dataset of many small blocks ("Invalid sort key
    column: part"); and without progress output (logs.QUIET_DATA). A Dataset carries the DataContext it was made in,
    so the caller's is switched too, and both are restored afterwards."""
    import ray.data

    settings = {"shuffle_strategy": ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED, **QUIET_DATA}
    contexts = {id(c): c for c in (ray.data.DataContext.get_current(), getattr(prompts, "context", None)) if c}
    saved = {k: {key: getattr(c, key) for key in settings} for k, c in contexts.items()}
    for c in contexts.values():
        for key, value in settings.items():
            setattr(c, key, value)
    try:
        yield
    finally:
        for k, c in contexts.items():
            for key, value in saved[k].items():
                setattr(c, key, value)


def _from_marker(dest: str, marker: dict[str, Any], *, skipped: bool) -> Prepared:
    return Prepared(dest, marker["rows"], marker["fingerprint"], marker["bad_rows"], marker["duplicates"],
                    skipped=skipped)


# --- where the rows are -----------------------------------------------------------------------------------------------


def data_config(cfg: SpinConfig, heldout: bool = False) -> DataConfig:
    """`cfg.data`, or its held-out split (eval.split, at most eval.rows)."""
    return dataclasses.replace(cfg.data, split=cfg.eval.split, max_rows=cfg.eval.rows) if heldout else cfg.data


def data_parts(cfg: DataConfig) -> list[Part]:
    """The data files of `cfg.path`, in the order their rows count: listed in the driver (a missing path, a folder
    of no data files or a missing datasets split is refused here, before Ray starts), read by the workers."""
    path = str(sources.BUNDLED) if cfg.path == "bundled" else cfg.path
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
        scheme = path.split("://", 1)[0]
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise sources.not_found(path)
        infos = [info] if info.type == pafs.FileType.File else sorted(
            (i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File and i.extension == "parquet" and not i.base_name.startswith(("_", "."))),
            key=lambda i: i.path)
        if not infos:
            raise ConfigError(f"data.path {path!r} holds no .parquet files")
        return [Part(f"{scheme}://{i.path}", "parquet", f"{scheme}://{i.path}", i.size, i.mtime_ns) for i in infos]
    if os.path.exists(path):
        local = Path(path)
        if sources.is_saved_dataset(local):
            return _arrow_parts(sources.load_saved(local, cfg.split), path)
        return [Part(str(f.absolute()), f.suffix[1:], str(f), f.stat().st_size, f.stat().st_mtime_ns)
                for f in sources.data_files(local)]
    if sources.looks_like_hub_id(path):
        return _arrow_parts(sources.load_hub(path, cfg.split), path)
    raise sources.not_found(path)


def _arrow_parts(ds: Any, source: str) -> list[Part]:
    """The Arrow shards behind a memory-mapped `datasets.Dataset` (a save_to_disk folder or the hub cache)."""
    files = [f["filename"] for f in ds.cache_files]
    return [Part(f, "arrow", source if len(files) == 1 else f, os.path.getsize(f), os.stat(f).st_mtime_ns)
            for f in files]


def _chunks(part: Part) -> Iterator[tuple[list[Any], list[int]]]:
    """(records, their line or row numbers) of one file, CHUNK at a time; an unreadable file is a ConfigError."""
    if part.kind == "jsonl":
        numbered: list[tuple[int, Any]] = []
        for n, record in sources.iter_jsonl(Path(part.uri)):
            numbered.append((n, record))
            if len(numbered) == CHUNK:
                yield [r for _, r in numbered], [n for n, _ in numbered]
                numbered = []
        if numbered:
            yield [r for _, r in numbered], [n for n, _ in numbered]
        return
    if part.kind == "json":
        rows, _ = sources.read_file(Path(part.uri))
        for i in range(0, len(rows), CHUNK):
            yield rows[i:i + CHUNK], list(range(i, min(i + CHUNK, len(rows))))
        return
    at = 0
    try:
        if part.kind == "arrow":
            batches = pa.ipc.open_stream(pa.memory_map(part.uri))
        else:
            import pyarrow.parquet as pq

            fs, path = records.filesystem(part.uri)
            batches = pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=CHUNK)
        for batch in batches:
            for i in range(0, batch.num_rows, CHUNK):
                rows = batch.slice(i, CHUNK).to_pylist()
                yield rows, list(range(at, at + len(rows)))
                at += len(rows)
    except (pa.ArrowException, OSError) as e:
        raise sources.unreadable_parquet(part.label, e) from None


# --- the pipeline -----------------------------------------------------------------------------------------------------


class Tally:
    """What the tasks tell the driver: a few numbers per file, partition and block, never rows."""

    def __init__(self) -> None:
        self.files: dict[int | str, dict[str, Any]] = {}  # by file index, or by a Dataset block's id
        self.duplicates, self.first_duplicate = 0, None
        self.digests: list[int] = []
        self.rows = 0

    def file(self, i: int | str, summary: dict[str, Any]) -> None:
        self.files[i] = summary

    def duplicate(self, n: int, earliest: tuple[int, int, int, int]) -> None:
        self.duplicates += n
        self.first_duplicate = min(earliest, self.first_duplicate or earliest)

    def block(self, digest: int, rows: int) -> None:
        self.digests.append(digest)
        self.rows += rows

    def summary(self) -> dict[str, Any]:
        return dict(vars(self))


def _pipeline(cfg: DataConfig, parts: list[Part], prompts: Source, tally: Any) -> "ray.data.Dataset":
    import ray
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if prompts is None:
        n_parts = max(1, math.ceil(sum(p.size for p in parts) / PARTITION_BYTES))
        # Local files are read on this node when it has CPUs: other nodes may not see them (a shared mount is fine
        # anywhere). Soft, so that a head started with --num-cpus=0 does not leave the reads unscheduled forever.
        node = ray.get_runtime_context().get_node_id() if "://" not in parts[0].uri else None
        here = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)} if node else {}
        ds = ray.data.from_items([{"file": i} for i in range(len(parts))], override_num_blocks=len(parts))
        with warnings.catch_warnings():  # Ray 2.60 has no other way to pass a scheduling strategy (pinned < 2.61)
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(_read_files, batch_size=1, batch_format="numpy", num_cpus=1, **here,
                                fn_kwargs=dict(parts=parts, split=cfg.split, on_bad_rows=cfg.on_bad_rows,
                                               n_parts=n_parts, tally=tally))
    else:
        n_parts = 2 * cpus
        ds = prompts if isinstance(prompts, ray.data.Dataset) else ray.data.from_arrow(prompts)
        columns = ds.schema().names
        normalised = set(PROMPT_SCHEMA.names) <= set(columns)
        shape = None if normalised else sources.detect_shape(columns, DATASET)
        ds = ds.map_batches(_read_dataset, batch_format="pyarrow",
                            fn_kwargs=dict(shape=shape, n_parts=n_parts, tally=tally))
    ds = ds.groupby("part", num_partitions=min(n_parts, 4 * cpus)).map_groups(
        _first_of_each, batch_format="pyarrow", fn_kwargs=dict(tally=tally))
    if cfg.max_rows is not None:  # the first N distinct good rows, in the data's order
        ds = ds.sort(["file", "at"]).limit(cfg.max_rows)
    return ds.map_batches(_digest, batch_format="pyarrow", batch_size=None, fn_kwargs=dict(tally=tally))


def _read_files(batch: dict[str, Any], *, parts: list[Part], split: str | None, on_bad_rows: str, n_parts: int,
                tally: Any) -> Iterator[pa.Table]:
    import ray

    for i in batch["file"]:
        i, part = int(i), parts[int(i)]
        summary: dict[str, Any] = {"shape": None, "splits": [], "rows": 0, "records": 0, "bad": {}, "first_bad": None,
                                   "error": None}
        splits, bad, shipped = set(), Counter(), False
        try:
            for chunk, ats in _chunks(part):
                rows = []
                for record, at in zip(chunk, ats):
                    if isinstance(record, dict):
                        summary["records"] += 1
                        if summary["shape"] is None:
                            summary["shape"] = sources.detect_shape(record.keys(), part.label)
                        if split is not None and "split" in record:
                            splits.add(record["split"])
                            if record["split"] != split:
                                continue
                    summary["rows"] += 1
                    try:
                        prompt, real = sources.split_pair(record, summary["shape"])
                    except ValueError as e:
                        bad[sources.bad_kind(e)] += 1
                        summary["first_bad"] = summary["first_bad"] or (i, at, part.where(at), str(e))
                        continue
                    rows.append(_row(prompt, real, i, at, n_parts))
                if rows:
                    shipped = True
                    yield pa.Table.from_pylist(rows, schema=ROW)
                if summary["first_bad"] and on_bad_rows == "error":
                    break  # only the earliest bad row matters now
        except ConfigError as e:
            summary["error"] = str(e)
        summary.update(splits=sorted(splits, key=str), bad=dict(bad))
        ray.get(tally.file.remote(i, summary))
        if not shipped:  # a block without a schema would fail the shuffle
            yield ROW.empty_table()


def _read_dataset(table: pa.Table, *, shape: str | None, n_parts: int, tally: Any) -> pa.Table:
    """One block of a caller's Dataset: its rows have no file or line, so a bad one is named by its content."""
    import ray

    if shape is None:  # already normalised: the ids are taken as they are
        ids = table.column("prompt_id").to_pylist()
        rows = [{"prompt_id": p, "prompt": m, "real": r, "file": 0, "at": 0, "part": records.id_part(p, n_parts)}
                for p, m, r in zip(ids, table.column("prompt").to_pylist(), table.column("real").to_pylist())]
        summary = {"rows": len(rows), "records": len(rows), "bad": {}, "first_bad": None}
    else:
        rows, bad, first_bad = [], Counter(), None
        for record in table.to_pylist():
            try:
                prompt, real = sources.split_pair(record, shape)
            except ValueError as e:
                bad[sources.bad_kind(e)] += 1
                first_bad = first_bad or (0, 0, f"a row of {DATASET} ({json.dumps(record, default=str)[:200]})",
                                          str(e))
                continue
            rows.append(_row(prompt, real, 0, 0, n_parts))
        summary = {"rows": table.num_rows, "records": table.num_rows, "bad": dict(bad), "first_bad": first_bad}
    ray.get(tally.file.remote(uuid.uuid4().hex, {"shape": shape, "splits": [], "error": None, **summary}))
    return pa.Table.from_pylist(rows, schema=ROW)


def _row(prompt: list[dict[str, str]], real: str, file: int, at: int, n_parts: int) -> dict[str, Any]:
    pid = sources.prompt_id(prompt, real)
    return {"prompt_id": pid, "prompt": prompt, "real": real, "file": file, "at": at,
            "part": records.id_part(pid, n_parts)}


def _first_of_each(table: pa.Table, *, tally: Any) -> pa.Table:
    """One hash partition: the first occurrence (in the data's order) of each prompt_id; the repeats are counted,
    and the earliest one reported with the row it repeats."""
    import numpy as np
    import ray

    table = table.sort_by([("prompt_id", "ascending"), ("file", "ascending"), ("at", "ascending")])
    ids = table.column("prompt_id").to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    if not first.all():
        files, ats = table.column("file").to_numpy(), table.column("at").to_numpy()
        run_start = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
        repeats = np.flatnonzero(~first)
        k = repeats[np.lexsort((ats[repeats], files[repeats]))[0]]
        earliest = (int(files[k]), int(ats[k]), int(files[run_start[k]]), int(ats[run_start[k]]))
        ray.get(tally.duplicate.remote(int((~first).sum()), earliest))
    return table.filter(pa.array(first)).drop_columns(["part"])


def _digest(table: pa.Table, *, tally: Any) -> pa.Table:
    import ray

    ray.get(tally.block.remote(block_digest(table.column("prompt_id").to_pylist()), table.num_rows))
    return table.select(PROMPT_SCHEMA.names).cast(PROMPT_SCHEMA)


# --- checks and the write ---------------------------------------------------------------------------------------------


def _check(tally: dict[str, Any], cfg: DataConfig, parts: list[Part]) -> None:
    """The errors load_sft gives, in its order: an unreadable file, mixed shapes, a missing split, no rows, the
    earliest bad row or repeat (data.on_bad_rows / data.duplicates = error), nothing good."""
    order = sorted(tally["files"])  # file indices, or a Dataset's block ids
    files = [tally["files"][k] for k in order]
    source = DATASET if not parts else cfg.path
    for f in files:
        if f["error"]:
            raise ConfigError(f["error"])
    shapes: dict[str, str] = {}
    for k in order:
        if tally["files"][k]["shape"] and parts:
            shapes.setdefault(tally["files"][k]["shape"], parts[k].label)
    if len(shapes) > 1:
        raise sources.mixed_shapes(shapes)
    present = {s for f in files for s in f["splits"]}
    if cfg.split is not None and present and cfg.split not in present:
        raise sources.no_split(cfg.split, sorted(str(s) for s in present if s is not None), cfg.path)
    n_input = sum(f["rows"] for f in files)
    if n_input == 0:
        raise ConfigError(f"{source!r} has no rows (after the split filter); check data.path and data.split")
    if not any(f["records"] for f in files):
        raise ConfigError(f"{source!r} holds no records (JSON objects / table rows); check data.path")
    bad = sum((Counter(f["bad"]) for f in files), Counter())
    first_bad = min((tuple(f["first_bad"]) for f in files if f["first_bad"]), default=None)
    repeat = tally["first_duplicate"] if cfg.duplicates == "error" else None
    if cfg.on_bad_rows == "error" and first_bad and (repeat is None or first_bad[:2] < tuple(repeat[:2])):
        raise sources.bad_row(first_bad[2], ValueError(first_bad[3]))
    if repeat is not None:
        def where(file: int, at: int) -> str:
            return parts[file].where(at) if parts else f"a row of {DATASET}"

        raise sources.repeated_row(where(*repeat[:2]), where(*repeat[2:]))
    sources.report_dropped(source, n_input, bad, tally["duplicates"])
    if not tally["rows"]:
        raise sources.all_bad(source, bad)


def _write(dest: str, pipeline: Any, cfg: DataConfig, parts: list[Part], source: Any) -> Prepared:
    """Run the pipeline into a temp folder beside `dest`, check what the tasks found, write the marker last, then
    rename into place (object stores: `dest` is cleared and written in place, marker last). A failed or refused
    prepare leaves nothing behind; leftovers of an interrupted one are removed first."""
    import ray

    fs, path = records.filesystem(dest)
    local = isinstance(fs, pafs.LocalFileSystem)
    work = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local else path
    if local:
        for stale in fs.get_file_info(pafs.FileSelector(os.path.dirname(path), allow_not_found=True)):
            if stale.base_name.startswith(os.path.basename(path) + ".tmp-"):
                fs.delete_dir(stale.path)
    elif fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    import ray.data

    tally = ray.remote(num_cpus=0)(Tally).remote()
    try:
        pipeline(tally).write_parquet(work if local else dest)
        found = ray.get(tally.summary.remote())
        _check(found, cfg, parts)
        prepared = Prepared(dest, found["rows"], fingerprint(found["digests"], found["rows"]),
                            dict(sum((Counter(f["bad"]) for f in found["files"].values()), Counter())),
                            found["duplicates"])
        marker = {"rows": prepared.rows, "fingerprint": prepared.fingerprint, "bad_rows": prepared.bad,
                  "duplicates": prepared.duplicates, "source": source}
        with fs.open_output_stream(records.join(work, records.MARKER)) as f:
            f.write(json.dumps(marker, indent=2).encode())
    except BaseException:
        if fs.get_file_info(work).type != pafs.FileType.NotFound:
            fs.delete_dir(work)
        raise
    finally:
        ray.kill(tally)
    if local:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
        fs.move(work, path)
    return prepared
