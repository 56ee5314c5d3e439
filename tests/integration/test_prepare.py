"""The prepare stage (spin_ray/data/prepare.py) on the session's real Ray cluster, with real files: what it writes equals
the in-driver reader's result (sources.load_sft, the oracle), bad rows and repeats are found across files and
partitions, a caller's Dataset goes through the same stage, and a finished folder is reused while an interrupted
one is redone."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from spin_ray.config import ConfigError, DataConfig, SpinConfig
from spin_ray.data import prepare as prepare_module
from spin_ray.data.prepare import prepare
from spin_ray.data.sources import load_sft, normalize
from spin_ray.stages.loop import as_prompts

pytestmark = pytest.mark.integration


def chat(q: str, a) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def folder_of_files(tmp_path):
    """Three files of one shape: the last repeats rows of the first two and holds a bad row."""
    data = tmp_path / "data"
    data.mkdir()
    a = [chat(f"a{i}", f"x{i}") for i in range(30)]
    b = [chat(f"b{i}", f"y{i}") for i in range(30)]
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (data / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b + b[:2]))  # repeats inside a file too
    late = [chat("c0", "z0"), a[3], b[7], chat("c1", " "), chat("c2", "z2")]
    pq.write_table(pa.Table.from_pylist(late), data / "c.parquet")
    return data


def written(path) -> list[str]:
    return sorted(pads.dataset(str(path), format="parquet", exclude_invalid_files=True).to_table()
                  .column("prompt_id").to_pylist())


def cli(tmp_path, *sets: str) -> subprocess.CompletedProcess:
    """`spin-ray prepare --json`: the result alone on stdout, progress and warnings on stderr."""
    args = [sys.executable, "-m", "spin_ray.cli", "prepare", "--json", "--set", f"storage={tmp_path / 'store'}",
            "--set", "eval.enabled=false", "--set", "data.max_rows=null"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_prepares_a_folder_with_repeats_across_files_and_a_bad_row_in_the_last(ray_cluster, tmp_path):
    data = folder_of_files(tmp_path)
    out = cli(tmp_path, f"data.path={data}")
    err = out.stderr.strip()
    assert out.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1] == (f"spin-ray prepare: error: '{data / 'c.parquet'}' row 3: empty content in "
                                    "`messages`. Fix the row, or set data.on_bad_rows=skip to drop such "
                                    "rows (they are counted)")
    assert not (tmp_path / "store" / "prompts").exists()
    out = cli(tmp_path, f"data.path={data}", "data.on_bad_rows=skip")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["rows"] == 62 and result["duplicates"] == 4
    assert result["bad_rows"] == {"empty content in `messages`": 1}
    oracle = load_sft(DataConfig(path=str(data), on_bad_rows="skip"))
    assert written(result["prompts"]) == sorted(r["prompt_id"] for r in oracle.rows)
    assert "dropped 4 duplicate rows of 67" in out.stderr


def test_many_partitions_keep_the_first_of_each_and_the_first_n(ray_cluster, tmp_path, monkeypatch):
    # A partition per few hundred bytes: the repeats meet their first occurrence through the shuffle.
    monkeypatch.setattr(prepare_module, "PARTITION_BYTES", 300)
    data = folder_of_files(tmp_path)
    settings = [f"storage={tmp_path / 'store'}", "data.on_bad_rows=skip", f"data.path={data}"]
    with pytest.raises(ConfigError, match=(rf"'{data / 'b.jsonl'}' line 31 repeats '{data / 'b.jsonl'}' line 1 "
                                           r"\(same prompt and answer\)")):
        prepare(SpinConfig.load(None, [*settings, "data.max_rows=null", "data.duplicates=error"]))
    first = prepare(SpinConfig.load(None, [*settings, "data.max_rows=40"]))
    oracle = load_sft(DataConfig(path=str(data), on_bad_rows="skip", max_rows=40))
    assert written(first.path) == sorted(r["prompt_id"] for r in oracle.rows) and first.duplicates == 4


def test_a_callers_dataset_goes_through_the_same_stage(ray_cluster, tmp_path):
    import ray.data

    rows = [chat(f"q{i}", f"a{i}") for i in range(20)]
    cfg = SpinConfig.load(None, [f"storage={tmp_path}", "data.on_bad_rows=skip"])
    prepared = as_prompts(ray.data.from_items(rows + rows[:5] + [chat("q", " ")], override_num_blocks=4), cfg)
    assert prepared.rows == 20 and prepared.duplicates == 5 and sum(prepared.bad.values()) == 1
    assert written(prepared.path) == sorted(r["prompt_id"] for r in normalize(rows).rows)
    normalised = normalize(rows).to_arrow()  # taken as it is, ids included
    again = as_prompts(ray.data.from_arrow(normalised), cfg)
    assert again.fingerprint == prepared.fingerprint and as_prompts(again, cfg) is again
    with pytest.raises(ConfigError, match=r"a row of the given Dataset .*: empty content"):
        as_prompts(ray.data.from_items(rows + [chat("q", " ")]), SpinConfig.load(None, [f"storage={tmp_path}"]))


def test_a_finished_folder_is_reused_and_an_interrupted_one_redone(ray_cluster, tmp_path):
    data = folder_of_files(tmp_path)
    cfg = SpinConfig.load(None, [f"storage={tmp_path / 'store'}", f"data.path={data}", "data.on_bad_rows=skip"])
    first = prepare(cfg)
    assert not first.skipped and prepare(cfg).skipped
    # Interrupted: a temp folder of a write that never finished, and a folder without its marker (object stores).
    store = tmp_path / "store"
    (store / "prompts.tmp-dead").mkdir()
    (store / "prompts.tmp-dead" / "part.parquet").write_bytes(b"half")
    (store / "prompts" / "_SUCCESS.json").unlink()
    again = prepare(cfg)
    assert not again.skipped and again.fingerprint == first.fingerprint
    assert sorted(p.name for p in store.iterdir()) == ["prompts"]
    (data / "a.jsonl").write_text(json.dumps(chat("new", "row")) + "\n")  # other data: prepared again
    changed = prepare(cfg)
    assert not changed.skipped and changed.rows == 34


def test_prepare_killed_while_writing_is_redone_by_the_rerun(ray_cluster, tmp_path):
    """A real kill: `spin-ray prepare` is SIGKILLed while its temp folder is being written; the rerun finishes, writes
    every distinct row once, and leaves no temp folder behind."""
    data = tmp_path / "data"
    data.mkdir()
    for f in range(6):  # 6 files x 4000 rows, the last 500 of each repeated in the next
        rows = [chat(f"q{i}", f"a{i}") for i in range(f * 3500, f * 3500 + 4000)]
        (data / f"{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    distinct = 5 * 3500 + 4000
    args = [sys.executable, "-m", "spin_ray.cli", "prepare", "--set", f"storage={tmp_path / 'store'}",
            "--set", "eval.enabled=false", "--set", "data.max_rows=null", "--set", f"data.path={data}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    store = tmp_path / "store"
    while not (store.exists() and any(p.name.startswith("prompts.tmp-") for p in store.iterdir())):
        assert proc.poll() is None, "prepare ended before it wrote a temp folder"  # a hang: pytest's timeout
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (store / "prompts").exists()  # nothing half-written under the final name

    out = cli(tmp_path, f"data.path={data}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["rows"] == distinct and result["duplicates"] == 5 * 500
    assert written(store / "prompts") == sorted(set(written(store / "prompts")))
    assert len(written(store / "prompts")) == distinct
    assert not [p.name for p in store.iterdir() if p.name.startswith("prompts.tmp-")]  # the killed one's is gone


def test_every_local_shape_streams_the_records_the_driver_reader_sees(tmp_path):
    # No Ray: the listing and the chunked reads the read tasks run, against data.read_records.
    import datasets

    from spin_ray.data.sources import read_records

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(7)]
    (tmp_path / "d.jsonl").write_text("\n" + "\n".join(json.dumps(r) for r in rows))  # line numbers count blanks
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "pq" / "b.parquet")
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    for path in ["d.jsonl", "d.json", "pq", "hf"]:
        cfg = DataConfig(path=str(tmp_path / path), split="train_sft" if path == "hf" else None)
        streamed, where = [], []
        for part in prepare_module.data_parts(cfg):
            for records, ats in prepare_module._chunks(part):
                streamed += records
                where += [part.where(at) for at in ats]
        assert (streamed, where) == read_records(cfg.path, cfg.split), path
