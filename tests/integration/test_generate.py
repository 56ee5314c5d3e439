"""Generation (answers and the pairs' token ids) on a real Ray cluster with the real vLLM engine (CPU build) and the tiny model."""

import os

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from transformers import AutoTokenizer

from spin_ray.data import records

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.data import schemas
from spin_ray.data.schemas import MESSAGE
from spin_ray.stages.generate import engine_env
from spin_ray.stages.loop import make_pairs

pytestmark = pytest.mark.integration


def config(storage, *extra):
    return SpinConfig.load(None, [f"storage={storage}", "data.max_rows=24", "generate.max_tokens=12",
                                  "generate.batch_size=8", "generate.num_cpus_per_actor=0.5",
                                  *extra])


@pytest.fixture(scope="module")
def pairs(tiny_model, ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("gen")
    cfg = config(storage, f"model={tiny_model}", "generate.backend=vllm")
    return cfg, make_pairs(cfg)


def read(path):
    return pads.dataset(path, format="parquet").to_table()


def test_every_prompt_once_with_the_schema(pairs):
    from spin_ray.data.sources import load_sft

    cfg, result = pairs
    table = read(result.path)
    expected = {r["prompt_id"] for r in load_sft(cfg.data).rows}
    ids = table.column("prompt_id").to_pylist()
    assert result.rows == table.num_rows == len(expected) == 24 and set(ids) == expected and len(set(ids)) == 24
    assert set(schemas.PAIRS_COLUMNS) <= set(table.column_names)
    assert table.schema.field("prompt").type.value_type == MESSAGE
    assert all(table.schema.field(k).type.value_type == pa.int32() for k in schemas.IDS)
    assert not set(schemas.LOGPS) & set(table.column_names)  # the reference comes from the trainer (train.py)
    assert set(table.column("iteration").to_pylist()) == {0}
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(0 < n <= 12 for n in table.column("generated_tokens").to_pylist())
    assert records.is_complete(result.path) and not any(".tmp-" in p for p in os.listdir(os.path.dirname(result.path)))


def test_token_ids_are_the_chat_template_and_the_answers(pairs, tiny_model):
    """The stored ids, written independently of spin_ray.training.template: the chat template with the generation prompt, then
    each answer and EOS (nothing is cut at these lengths)."""
    _, result = pairs
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for r in read(result.path).to_pylist()[:6]:
        text = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        assert r["prompt_ids"] == tok(text, add_special_tokens=False).input_ids
        for key, answer in (("real_ids", r["real"]), ("generated_ids", r["generated"])):
            assert r[key] == tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_rerun_skips_the_finished_stage(pairs):
    cfg, result = pairs
    before = {f: os.path.getmtime(os.path.join(result.path, f)) for f in os.listdir(result.path)}
    again = make_pairs(cfg)
    assert again.skipped and again.rows == result.rows
    assert {f: os.path.getmtime(os.path.join(result.path, f)) for f in os.listdir(result.path)} == before


def test_sampling_is_reproducible_per_prompt(pairs, tmp_path):
    cfg, result = pairs
    # Another batching of the same prompts gives the same answers: the seed is per prompt, not per batch.
    # Nor on how many batches each engine holds at once (the fixture: batches_in_flight 2, the default).
    again = make_pairs(config(tmp_path, f"model={cfg.model}", "generate.backend=vllm", "generate.batch_size=5",
                              "generate.batches_in_flight=1"))
    first = {r["prompt_id"]: r["generated"] for r in read(result.path).to_pylist()}
    second = {r["prompt_id"]: r["generated"] for r in read(again.path).to_pylist()}
    assert first == second


def test_transformers_backend_and_greedy_agreement(tiny_model, ray_cluster, tmp_path):
    # Greedy answers of both engines match: the engine gets exactly the prompt tokens the trainer conditions on.
    common = [f"model={tiny_model}", "generate.temperature=0", "data.max_rows=8"]
    hf = make_pairs(config(tmp_path / "hf", *common, "generate.backend=transformers"))
    vl = make_pairs(config(tmp_path / "vllm", *common, "generate.backend=vllm"))
    hf_rows = {r["prompt_id"]: r for r in read(hf.path).to_pylist()}
    vl_rows = {r["prompt_id"]: r for r in read(vl.path).to_pylist()}
    assert hf_rows.keys() == vl_rows.keys() and len(hf_rows) == 8
    for pid, r in hf_rows.items():
        assert r["generated"] == vl_rows[pid]["generated"]
        assert r["finish_reason"] == vl_rows[pid]["finish_reason"]
        assert r["generated_ids"] == vl_rows[pid]["generated_ids"]


def test_bad_input_fails_before_actors(tiny_model, ray_cluster, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        make_pairs(config(tmp_path, f"model={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="generate.num_actors = 64 needs 32 CPU"):
        make_pairs(config(tmp_path, f"model={tiny_model}", "generate.num_actors=64"))
    with pytest.raises(ConfigError, match="data.path"):
        make_pairs(config(tmp_path, f"model={tiny_model}", f"data.path={tmp_path / 'none.parquet'}"))
    assert not os.path.exists(tmp_path / "iter_0")


def test_actor_pools_release_their_resources(pairs, ray_cluster):
    # On a GPU cluster the engines' GPUs must be free before Train workers ask for them.
    import time

    import ray

    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_pairs_not_exactly_once_are_refused_unfinished(ray_cluster, tmp_path, monkeypatch):
    # Ray tasks count the written ids per hash partition (here 4 partitions of at most 3 ids each): a lost or a
    # repeated row (a retried batch written twice) fails the stage and leaves no finished folder.
    import ray.data

    rows = [{"prompt_id": f"p{i:02d}", "x": i} for i in range(10)]
    monkeypatch.setattr(records, "IDS_PER_TASK", 3)
    assert records.write_pairs(ray.data.from_items(rows), str(tmp_path / "ok"), expected_rows=10) == {"rows": 10}
    for name, written, message in (("lost", rows[:9], "1 missing, 0 duplicated"),
                                   ("twice", rows + rows[3:5], "0 missing, 2 duplicated"),
                                   ("swapped", rows[:9] + rows[:1], "1 missing, 1 duplicated")):
        with pytest.raises(RuntimeError, match=message):
            records.write_pairs(ray.data.from_items(written), str(tmp_path / name), expected_rows=10)
        assert not records.is_complete(str(tmp_path / name)) and not (tmp_path / name).exists()


def test_prompts_reach_the_engines_in_blocks_of_one_batch(ray_cluster, tmp_path):
    # Read as it is, the prepared folder is one block here, which Ray Data would hand to a single engine of the pool.
    from spin_ray.stages.loop import as_prompts

    prompts = as_prompts(None, config(tmp_path, "data.max_rows=20"))
    assert prompts.dataset().materialize().num_blocks() == 1
    blocks = prompts.dataset(rows_per_block=8).materialize()
    assert blocks.num_blocks() == 3 and sorted(r["prompt_id"] for r in blocks.take_all()) == \
        prompts.table().column("prompt_id").to_pylist()


def test_batches_in_flight_share_one_engine_and_keep_every_answer(tiny_model, ray_cluster):
    import ray

    def _engine_in_flight(model):  # nested: Ray ships it by value
        """In a Ray worker (vLLM lowers the torch threads of its process): three calls of 8 prompts on one real vLLM
        engine, first one at a time, then all three at once from three threads."""
        import threading

        from transformers import AutoTokenizer

        from spin_ray.config import GenerateConfig
        from spin_ray.stages.generate import VllmEngine

        tokenizer = AutoTokenizer.from_pretrained(model)
        prompts = [tokenizer.encode(f"Count the letters: {'ab' * (1 + i % 5)}{i}") for i in range(24)]
        chunks = [(prompts[i:i + 8], list(range(100 + i, 108 + i))) for i in range(0, 24, 8)]
        engine = VllmEngine(model, GenerateConfig(max_tokens=12, temperature=1.0), on_gpu=False, max_model_len=128)
        one_at_a_time = [engine.generate(*chunk) for chunk in chunks]
        peak_alone = engine.peak_requests
        together, start = [None] * 3, threading.Barrier(3)

        def call(k):
            start.wait()
            together[k] = engine.generate(*chunks[k])

        threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return one_at_a_time, together, peak_alone, engine.peak_requests

    alone, together, peak_alone, peak = ray.get(ray.remote(num_cpus=0.5, runtime_env={"env_vars": engine_env()})(
        _engine_in_flight).remote(tiny_model))
    assert peak_alone == 8 and peak > 8  # one scheduler held more than one call's requests at once
    assert together == alone  # per-prompt seeds: the same answers, whatever else the engine was decoding
    assert all(a.num_tokens > 0 for answers in alone for a in answers)
