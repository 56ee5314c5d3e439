"""Input that real users have, written to real files and given to the real CLI: each case ends in one
paragraph naming the file, row or field and the fix, exit code 2, with nothing already written touched. Config,
storage and model problems are refused before ray.init; the data is read by the prepare stage on the cluster (the
session's, `ray_cluster`), which refuses bad rows before any GPU work and leaves only its log behind."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

CHAT = {"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]}
pytestmark = pytest.mark.integration  # the real CLI in subprocesses, some on the session's Ray cluster
SENTINEL = "finished work of an earlier run\n"


def spin_ray(tmp_path: Path, *sets: str, command: str, storage: Path, config: Path | None = None,
             as_json: bool = False) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "spin_ray.cli", command, *(["--config", str(config)] if config else []),
            *(["--json"] if as_json else [])]
    for s in (f"storage={storage}", *sets):
        args += ["--set", s]
    # The session's cluster where a test has one (the data cases); else, should a case get past the checks, it
    # starts its own cluster instead of joining another.
    env = {**os.environ, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "local"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def refused(tmp_path: Path, *sets: str, command: str = "generate", config: Path | None = None,
            storage: Path | None = None, whole: bool = False) -> str:
    """Run `spin-ray COMMAND` in tmp_path over a storage that already holds a file; return the error paragraph
    (`whole`: all of the output, which holds the progress and warning lines before it)."""
    if storage is None:
        storage = tmp_path / "store"
        storage.mkdir(exist_ok=True)
        (storage / "keep.txt").write_text(SENTINEL)
    out = spin_ray(tmp_path, *sets, command=command, storage=storage, config=config)
    err = out.stderr.strip()
    assert out.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "Ray" not in err, err[-3000:]  # one paragraph: Ray's output is in the log
    paragraph = err.splitlines()[-1]
    assert paragraph.startswith(f"spin-ray {command}: error: "), err[-3000:]
    if storage.is_dir():  # nothing written but the command's log: no prompts, the earlier file as it was
        assert sorted(p.name for p in storage.iterdir() if p.name != "logs") == ["keep.txt"]
        assert (storage / "keep.txt").read_text() == SENTINEL
    return out.stdout + err if whole else paragraph


def prepared(tmp_path: Path, *sets: str) -> tuple[dict, str]:
    """`spin-ray prepare`'s result, which must succeed, and its terminal output (progress and warnings)."""
    out = spin_ray(tmp_path, *sets, "eval.enabled=false", command="prepare", storage=tmp_path / "prepared",
                   as_json=True)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return json.loads(out.stdout), out.stderr  # --json: the result alone on stdout, progress on stderr


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- data files ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_number_content_row(ray_cluster, tmp_path, on_bad_rows):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}
    path = jsonl(tmp_path / "d.jsonl", [CHAT, bad] if on_bad_rows == "error" else [bad])
    msg = refused(tmp_path, f"data.path={path}", f"data.on_bad_rows={on_bad_rows}")
    if on_bad_rows == "error":
        assert "d.jsonl' line 2: non-string content in `messages`: a number (42)" in msg
        assert "data.on_bad_rows=skip" in msg
    else:  # skipped and counted; a file of nothing else has nothing to train on
        assert "every row of" in msg and "non-string content in `messages`: a number" in msg


@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_mixed_string_and_list_prompts_are_read_and_a_later_bad_row_is_named(ray_cluster, tmp_path, on_bad_rows):
    """pyarrow could not build one column of both (ArrowInvalid); the rows are read as Python objects, so the good
    ones pass."""
    rows = [{"prompt": "Sort: cab", "completion": "abc"},
            {"prompt": [{"role": "user", "content": "Count: aa"}], "completion": "2"},
            {"prompt": "Say hi", "completion": 3}]
    path = jsonl(tmp_path / "mixed.jsonl", rows)
    if on_bad_rows == "error":
        assert "mixed.jsonl' line 3: `completion` is a number (3)" in refused(tmp_path, f"data.path={path}")
    else:
        result, _ = prepared(tmp_path, f"data.path={path}", "data.on_bad_rows=skip")
        assert result["rows"] == 2 and result["bad_rows"] == {"`completion` is a number": 1}


def test_non_utf8_bytes(ray_cluster, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"))
    msg = refused(tmp_path, f"data.path={path}")
    assert "latin1.jsonl' line 2 is not UTF-8 (byte 0xe9)" in msg and "iconv" in msg


def test_corrupt_parquet(ray_cluster, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([CHAT]), folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    msg = refused(tmp_path, f"data.path={folder}")
    assert "b.parquet' is not a readable parquet file" in msg and "re-export it" in msg


def test_folder_of_files_with_different_shapes(ray_cluster, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    jsonl(folder / "chat.jsonl", [CHAT])
    jsonl(folder / "trl.jsonl", [{"prompt": "q", "completion": "a"}])
    msg = refused(tmp_path, f"data.path={folder}")
    assert "chat.jsonl' is chat (`messages`)" in msg and "trl.jsonl' is TRL" in msg and "one shape per folder" in msg


def test_duplicate_rows_are_dropped_and_counted_but_broken_rows_still_stop(ray_cluster, tmp_path):
    """uclaml/SPIN's SPIN_iter0 shape with every row twice (uclaml/SPIN#10): read, the repeats dropped and counted;
    a really broken row still follows data.on_bad_rows."""
    rows = [{"real": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "generated": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "g"}]}
            for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows + rows), tmp_path / "spin.parquet")
    result, output = prepared(tmp_path, "data.path=spin.parquet")
    assert result["rows"] == 4 and result["duplicates"] == 4
    assert "dropped 4 duplicate rows of 8 in 'spin.parquet'" in output
    msg = refused(tmp_path, "data.path=spin.parquet", "data.duplicates=error")
    assert "spin.parquet' row 4 repeats 'spin.parquet' row 0 (same prompt and answer)" in msg
    broken = rows + rows + [{"real": [{"role": "user", "content": "q"}], "generated": []}]
    pq.write_table(pa.Table.from_pylist(broken), tmp_path / "spin.parquet")
    msg = refused(tmp_path, "data.path=spin.parquet")
    assert "spin.parquet' row 8: no final assistant turn" in msg and "data.on_bad_rows=skip" in msg


@pytest.mark.parametrize("path", ["data/train", "sft/train.jsonl"])
def test_missing_relative_data_path_is_not_a_hub_name(tmp_path, path):
    (tmp_path / "data").mkdir()
    msg = refused(tmp_path, f"data.path={path}")
    assert f"data.path '{path}' not found (relative to {tmp_path})" in msg


# --- config files and --set ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, needle", [
    (b"train:\n  beta: 1\n lr: 2\n", "is not valid YAML: "),
    (b"model: tiny\nstorage: runs/caf\xe9\n", "line 2 is not UTF-8 (byte 0xe9)"),
    (b"train:\n  1: 2\n", "key 1 in train is not text"),
])
def test_bad_config_file(tmp_path, content, needle):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    msg = refused(tmp_path, config=path)
    assert "c.yaml" in msg and needle in msg


@pytest.mark.parametrize("override, needle", [
    ("train.lr=[1", "override 'train.lr=[1': the value is not valid YAML"),
    ("train.betta=1", "unknown config key 'train.betta'; did you mean train.beta?"),
    ("generate.num_cpus_per_actor=-1", "generate.num_cpus_per_actor = -1.0: must be > 0"),
    ("data.max_length=-5", "data.max_length = -5: must be >= 2"),
    ("generate.dtype=bfloat61", "generate.dtype = 'bfloat61'"),
    ("train.lr=inf", "train.lr = inf: must be a finite number"),
    ("train.lr=.nan", "train.lr = nan: must be a finite number"),
    ("eval.split=train", "eval.split = 'train': must differ from data.split ('train')"),
    ("generate.batches_in_flight=0", "generate.batches_in_flight = 0: must be >= 1"),
])
def test_bad_set_value(tmp_path, override, needle):
    assert needle in refused(tmp_path, override, command="run")


def test_a_micro_batch_larger_than_the_global_batch_is_not_refused(tmp_path):
    # The embedded config's micro-batch is 32 pairs: a global batch of 8 is one micro-batch per step, not an error;
    # the command gets as far as the data it is given (missing here, so nothing runs).
    msg = refused(tmp_path, "train.global_batch_size=8", "data.path=missing.jsonl")
    assert "global_batch_size" not in msg and "data.path 'missing.jsonl' not found" in msg


@pytest.mark.parametrize("workers", ["2", "auto"])
def test_a_train_command_is_not_refused_for_warm_engines_it_never_starts(tiny_model, tmp_path, workers):
    # The embedded config keeps warm engines (generate.keep_warm) for `run`; `train` starts none, so 2 workers fit
    # the local cluster, and the command goes on to look for the pairs it trains on. `auto` on this CPU cluster: 1.
    out = subprocess.run([sys.executable, "-m", "spin_ray.cli", "train", "--set", f"model={tiny_model}",
                          "--set", f"storage={tmp_path / 'store'}", "--set", f"train.num_workers={workers}"],
                         cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                         capture_output=True, text=True, timeout=300)
    err = out.stderr.strip()
    assert out.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "keep_warm" not in err and "no finished pairs for iteration 0" in err, err[-3000:]


# --- models ----------------------------------------------------------------------------------------------------------


def test_missing_relative_model_path_is_not_a_hub_id(tmp_path):
    (tmp_path / "models").mkdir()
    msg = refused(tmp_path, "model=models/mine")
    assert f"model 'models/mine' not found: {tmp_path / 'models' / 'mine'} does not exist" in msg


def broken_copy(tiny_model: str, tmp_path: Path, breakage: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    if breakage == "no chat template":
        (model / "chat_template.jinja").unlink()
    elif breakage == "pickle weights":
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
    elif breakage == "remote code":
        config = json.loads((model / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyModel"}
        (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("breakage, needle", [
    ("no chat template", "has no chat template"),
    ("pickle weights", "holds only pickle weights (pytorch_model.bin)"),
    ("remote code", "set trust_remote_code=true only if you trust it"),
])
def test_model_folder_checked_without_loading_weights(tiny_model, tmp_path, breakage, needle):
    model = broken_copy(tiny_model, tmp_path, breakage)
    msg = refused(tmp_path, f"model={model}", command="generate")
    assert f"model '{model}'" in msg and needle in msg


# --- storage ---------------------------------------------------------------------------------------------------------


def test_storage_that_is_a_file(tiny_model, tmp_path):
    path = tmp_path / "runs"
    path.write_text(SENTINEL)
    msg = refused(tmp_path, f"model={tiny_model}", storage=path)
    assert f"storage = '{path}': {path} is a file, not a folder" in msg
    assert path.read_text() == SENTINEL


def test_storage_that_is_not_writable(tiny_model, tmp_path):
    # /proc takes no new folders, even for root (a chmod'ed folder would not stop root).
    msg = refused(tmp_path, f"model={tiny_model}", storage=Path("/proc/spin-ray-test/run"))
    assert "storage = '/proc/spin-ray-test/run' is not writable" in msg


@pytest.mark.parametrize("breakage, needle", [
    ("pickle weights", "holds only pickle weights (pytorch_model.bin)"),
    ("remote code", "set trust_remote_code=true only if you trust it"),
])
def test_serve_refuses_an_unsafe_model_folder(tiny_model, tmp_path, breakage, needle):
    model = broken_copy(tiny_model, tmp_path, breakage)
    out = subprocess.run([sys.executable, "-m", "spin_ray.cli", "serve", str(model)], cwd=tmp_path, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": "local"}, capture_output=True, text=True)
    err = out.stderr.strip()
    assert out.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith("spin-ray serve: error: ") and needle in err, err[-3000:]
