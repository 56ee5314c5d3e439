import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_ray.config import ConfigError, DataConfig
from spin_ray.data.sources import BadRowError, load_sft, normalize, prompt_id

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}


def test_multi_turn_chat_prompt_is_everything_before_the_last_assistant_turn():
    (row,) = normalize([CHAT]).rows
    assert row["prompt"] == CHAT["messages"][:-1] and row["real"] == "4"
    assert row["prompt_id"] == prompt_id(CHAT["messages"][:-1], "4") and len(row["prompt_id"]) == 16


def test_three_shapes_give_the_same_row():
    msgs = [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]
    chat = normalize([{"messages": msgs}]).rows
    trl = normalize([{"prompt": "Reverse: abc", "completion": "cba"}]).rows
    trl_chat = normalize([{"prompt": msgs[:1], "completion": msgs[1:]}]).rows
    spin = normalize([{"real": msgs, "generated": [msgs[0], {"role": "assistant", "content": ""}]}]).rows
    assert chat == trl == trl_chat == spin


@pytest.mark.parametrize("record, problem", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no final assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}, "non-string content"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]}, "no user turn"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
    ({"messages": [{"content": "x"}]}, "without role"),
])
def test_each_bad_row_kind_is_an_error_naming_row_and_problem(record, problem):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(BadRowError, match=rf"row 1: .*{problem}.*on_bad_rows=skip"):
        normalize([good, record])


def test_skip_counts_bad_rows_and_duplicates_are_dropped_apart():
    good = {"prompt": "q", "completion": "a"}
    data = normalize([good, {"prompt": "q2", "completion": ""}, good, {"prompt": "q3", "completion": "b"}],
                     on_bad_rows="skip")
    assert [r["real"] for r in data.rows] == ["a", "b"]
    assert data.n_input == 4 and dict(data.bad) == {"empty content in `completion`": 1} and data.duplicates == 1
    with pytest.raises(BadRowError, match=r"'data' row 2 repeats 'data' row 0 .*data.duplicates=drop"):
        normalize([good, {"prompt": "q3", "completion": "b"}, good], duplicates="error")


def test_unknown_schema():
    with pytest.raises(ConfigError, match=r"unknown data schema.*\['answer', 'question'\]"):
        normalize([{"question": "q", "answer": "a"}])


def test_local_files_folders_and_save_to_disk(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), folder / "b.parquet")
    import datasets

    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    expected = normalize(rows).rows
    assert load_sft(DataConfig(path=str(tmp_path / "d.jsonl"))).rows == expected
    assert load_sft(DataConfig(path=str(folder))).rows == expected
    assert load_sft(DataConfig(path=str(tmp_path / "hf"), split="train_sft")).rows == expected
    with pytest.raises(ConfigError, match=r"data.split 'train' .*\['train_sft'\].* \(did you mean 'train_sft'\?\)"):
        load_sft(DataConfig(path=str(tmp_path / "hf")))
    assert len(load_sft(DataConfig(path=str(folder), max_rows=2)).rows) == 2


def test_missing_path_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="data.path .*nope.* not found"):
        load_sft(DataConfig(path=str(tmp_path / "nope")))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="not valid JSONL"):
        load_sft(DataConfig(path=str(tmp_path / "bad.jsonl")))


def test_bundled_split_filter():
    train = load_sft(DataConfig(path="bundled", split="train"))
    test = load_sft(DataConfig(path="bundled", split="test"))
    assert train.n_input > test.n_input > 0 and not train.bad
    assert not {r["prompt_id"] for r in train.rows} & {r["prompt_id"] for r in test.rows}
    with pytest.raises(ConfigError, match="data.split 'dev'"):
        load_sft(DataConfig(path="bundled", split="dev"))


# --- real files, as users have them -------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_number_content_in_a_jsonl_file_is_a_bad_row_naming_its_line(tmp_path):
    rows = [CHAT, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(BadRowError, match=r"d.jsonl' line 2: non-string content in `messages`: a number \(7\)"):
        load_sft(DataConfig(path=path))
    data = load_sft(DataConfig(path=path, on_bad_rows="skip"))
    assert len(data.rows) == 1 and dict(data.bad) == {"non-string content in `messages`: a number": 1}


@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_string_and_list_prompts_mix_in_one_file(tmp_path, on_bad_rows):
    msgs = [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]
    rows = [{"prompt": "Sort: cab", "completion": "abc"}, {"prompt": msgs[:1], "completion": msgs[1:]},
            {"prompt": "Count: aa", "completion": [{"role": "assistant", "content": "2"}]}]
    data = load_sft(DataConfig(path=write_jsonl(tmp_path / "mixed.jsonl", rows), on_bad_rows=on_bad_rows))
    assert [r["real"] for r in data.rows] == ["abc", "cba", "2"] and not data.bad


def test_a_row_of_another_shape_is_a_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, {"prompt": "q", "completion": "a"}, "just text"])
    (tmp_path / "d.jsonl").write_text("\n" + (tmp_path / "d.jsonl").read_text())  # line numbers count blank lines
    with pytest.raises(BadRowError, match=r"line 3: no `messages` \(the first row is chat"):
        load_sft(DataConfig(path=path))
    data = load_sft(DataConfig(path=path, on_bad_rows="skip"))
    assert len(data.rows) == 1 and sum(data.bad.values()) == 2


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.jsonl' line 2 is not UTF-8 \(byte 0xe9\).*iconv"):
        load_sft(DataConfig(path=str(path), on_bad_rows="skip"))


def test_corrupt_parquet_names_the_file(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([CHAT]), folder / "a.parquet")
    (folder / "b.parquet").write_bytes((folder / "a.parquet").read_bytes()[:100])  # a truncated copy
    with pytest.raises(ConfigError, match=r"b.parquet' is not a readable parquet file"):
        load_sft(DataConfig(path=str(folder)))


def test_files_of_one_folder_with_different_shapes(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [CHAT])
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "completion": "a"}]), folder / "b.parquet")
    with pytest.raises(ConfigError, match=r"a.jsonl' is chat .*b.parquet' is TRL"):
        load_sft(DataConfig(path=str(folder)))


def test_spin_iter0_shape_with_every_row_twice_drops_the_repeats(tmp_path):
    """uclaml/SPIN's SPIN_iter0 holds every row twice (uclaml/SPIN#10)."""
    rows = [{"real": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "generated": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "g"}]}
            for i in range(3)]
    path = tmp_path / "spin.parquet"
    pq.write_table(pa.Table.from_pylist(rows + rows), path)
    data = load_sft(DataConfig(path=str(path)))
    assert [r["real"] for r in data.rows] == ["a0", "a1", "a2"] and data.duplicates == 3 and not data.bad
    with pytest.raises(BadRowError, match=r"spin.parquet' row 3 repeats '.*spin.parquet' row 0 \(same prompt and"):
        load_sft(DataConfig(path=str(path), duplicates="error"))


def test_missing_relative_paths_are_not_taken_for_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for path in ["data/train", "mydata/train.jsonl"]:
        with pytest.raises(ConfigError, match=rf"data.path '{path}' not found \(relative to"):
            load_sft(DataConfig(path=path))
