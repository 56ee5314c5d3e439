import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_ray.config import ConfigError, DataConfig
from spin_ray.data import BadRowError, load_sft, normalize, prompt_id

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


def test_skip_counts_bad_rows_and_duplicates():
    good = {"prompt": "q", "completion": "a"}
    data = normalize([good, {"prompt": "q2", "completion": ""}, good, {"prompt": "q3", "completion": "b"}],
                     on_bad_rows="skip")
    assert [r["real"] for r in data.rows] == ["a", "b"]
    assert data.n_input == 4 and dict(data.bad) == {"empty content in `completion`": 1, "duplicate": 1}


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
    with pytest.raises(ConfigError, match=r"data.split 'train' .*\['train_sft'\]"):
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
