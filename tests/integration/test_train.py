"""The trainer on real Ray Train workers (gloo, CPU) with the tiny model, on pairs made by the real pipeline."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.data import records

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.data import schemas
from spin_ray.stages.loop import make_pairs
from spin_ray.stages.train import train
from spin_ray.training.checkpoint import STATE

pytestmark = pytest.mark.integration

# resources=cpu: these tests are about CPU training whatever the cluster detection says.
FAST = ["resources=cpu", "train.micro_batch_size=4", "train.global_batch_size=8", "train.optimizer=adamw",
        "train.beta=1.0", "train.num_cpus_per_worker=1", "train.report_every=2"]


@pytest.fixture(scope="module")
def pairs(tiny_model, ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("pairs")
    cfg = SpinConfig.load(None, [f"model={tiny_model}", f"storage={storage}", "resources=cpu", "data.max_rows=32",
                                 "generate.max_tokens=12", "generate.num_cpus_per_actor=0.5",
                                ])
    return make_pairs(cfg).path


def cfg_for(tiny_model, storage, *extra):
    return SpinConfig.load(None, [f"model={tiny_model}", f"storage={storage}", *FAST, *extra])


def metrics(storage, t=0):
    with open(os.path.join(storage, f"iter_{t}", "train_metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_first_step_is_ln2_then_loss_falls(tiny_model, pairs, tmp_path):
    result = train(cfg_for(tiny_model, tmp_path, "train.lr=1e-3", "train.epochs=3", "train.checkpoint_every=5"),
                   pairs=[pairs])
    lines = metrics(tmp_path)
    assert [m["step"] for m in lines] == list(range(1, 13))  # 32 pairs / 8 per step x 3 epochs
    first = lines[0]
    # The policy starts as the reference: the reference pass is the step's own forward (other micro-batches: equal up
    # to float summation order).
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first["rewards/real"]) < 1e-5 and abs(first["rewards/generated"]) < 1e-5
    # θ_0's reference log-probs, stored beside the model for restarts, equal a plain HF forward of each pair (fp32:
    # other kernels and summation order, so to float precision of sums of ~100 nats).
    ref = records.read_table(str(tmp_path / "iter_0" / "reference"))
    assert ref.column_names == list(schemas.REFERENCE_COLUMNS) and ref.num_rows == 32
    # The stage reports the pass's seconds as its marker recorded them (their value is benchmarks' business).
    marker = records.read_json(str(tmp_path / "iter_0" / "reference" / records.MARKER))
    assert result.reference_seconds == marker["seconds"] and marker["rows"] == 32
    by_id = {r["prompt_id"]: r for r in pq.read_table(pairs).to_pylist()}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    theta0 = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for row in ref.slice(0, 6).to_pylist():
        pair = by_id[row["prompt_id"]]
        assert row["ref_logp_real"] == pytest.approx(direct_logp(theta0, tok, pair["prompt"], pair["real"]), rel=1e-6)
        assert row["ref_logp_generated"] == pytest.approx(
            direct_logp(theta0, tok, pair["prompt"], pair["generated"]), rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s", "rewards/real", "rewards/generated", "logps/real"} <= first.keys()
    assert all(0 <= m["padding_share"] < 0.5 and m["beta"] == 1.0 for m in lines)
    assert sum(m["loss"] for m in lines[-4:]) / 4 < 0.5 * math.log(2)
    assert lines[-1]["rewards/accuracies"] > 0.5 and lines[-1]["rewards/margins"] > 0
    assert result.model == os.path.join(tmp_path, "iter_0", "model") and not result.skipped
    model = AutoModelForCausalLM.from_pretrained(result.model)
    # Steps 5 and 10 saved the resumable DCP state (a `state` folder in each Ray Train checkpoint); the finished run
    # keeps none of it, in the exported model or anywhere in the iteration's folder.
    assert STATE not in os.listdir(result.model)
    assert not [here for here, dirs, _ in os.walk(tmp_path) if STATE in dirs]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(model.lm_head.weight, reference.lm_head.weight)
    # A second call finds the finished model and does nothing.
    assert train(cfg_for(tiny_model, tmp_path, "train.lr=1e-3", "train.epochs=3"), pairs=[pairs]).skipped


def direct_logp(model, tokenizer, prompt, answer):
    """log π(answer | prompt) by a plain HF forward of one sequence, written independently of spin_ray.training.template."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    p = tokenizer(text, add_special_tokens=False).input_ids
    a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([p + a])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    return sum(logprobs[len(p) + i - 1, t].item() for i, t in enumerate(a))


def test_two_workers_and_fsdp_take_the_same_steps_as_one(tiny_model, pairs, tmp_path):
    # 1 worker x 4 micro-batches, 2 workers x 2 under DDP and under FSDP2 see the same global batches. FSDP2 with
    # gradient accumulation once trained nothing (gradient sync never turned back on: grad_norm 0, no update).
    steps = ["train.lr=1e-4", "train.epochs=1", "train.micro_batch_size=2"]
    one = train(cfg_for(tiny_model, tmp_path / "one", *steps), pairs=[pairs])
    # DDP micro-batches formed by a token budget instead (padding-free batching): the same mean loss.
    two = train(cfg_for(tiny_model, tmp_path / "two", *steps, "train.num_workers=2", "train.micro_batch_tokens=256",
                        "data.max_length=128", "data.max_prompt_length=64", "generate.max_tokens=12"), pairs=[pairs])
    # FSDP2 (fully_shard, meta init + rank-0 broadcast) with full activation checkpointing is the 7B path; gloo on CPU.
    fsdp = train(cfg_for(tiny_model, tmp_path / "fsdp", *steps, "train.num_workers=2", "train.strategy=fsdp",
                         "train.activation_checkpointing=full"), pairs=[pairs])
    # HSDP for multi-node: a 2 x 2 mesh (shard within pairs of workers, replicate across the pairs), 2 micro-batches
    # each: reduce-scattered every micro-batch, all-reduced across the pairs in the last one only; with selective
    # (op-level) activation checkpointing.
    hsdp = train(cfg_for(tiny_model, tmp_path / "hsdp", *steps, "train.num_workers=4", "train.strategy=fsdp",
                         "train.hsdp_shard_size=2", "train.micro_batch_size=1",
                         "train.activation_checkpointing=selective"), pairs=[pairs])
    a = metrics(tmp_path / "one")
    wa = AutoModelForCausalLM.from_pretrained(one.model).state_dict()
    w0 = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert max((wa[k] - w0[k]).abs().max().item() for k in wa) > 1e-5  # training moved the weights
    assert all(m["grad_norm"] > 0 for m in a) and all(0 <= m["padding_share"] < 0.5 for m in a)
    for run in (two, fsdp, hsdp):
        # Exported by rank 0 in θ_0's dtype, without the resumable state (DCP shards stay in ray_train, then go).
        assert sorted(os.listdir(run.model)) == sorted(os.listdir(one.model))
        assert not os.path.exists(os.path.join(os.path.dirname(run.model), "ray_train"))
        b = metrics(os.path.dirname(os.path.dirname(run.model)))
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):  # tolerance: fp32 sums in another order (all-reduce vs local accumulation)
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
            assert x["tokens"] == y["tokens"]
        wb = AutoModelForCausalLM.from_pretrained(run.model).state_dict()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_lora_under_ddp_and_fsdp_takes_the_same_steps_and_exports_merged(tiny_model, pairs, tmp_path):
    """train.lora on 1 worker, on 2 DDP workers and on 2 FSDP2 workers (adapters injected on the meta model, rank
    0's broadcast): the same global batches give the same steps; only the adapted matrices of θ_{t+1} differ."""
    steps = ["train.lr=1e-3", "train.epochs=1", "train.micro_batch_size=2", "train.lora.r=4",
             "train.lora.target_modules=[q_proj, v_proj, down_proj]"]
    one = train(cfg_for(tiny_model, tmp_path / "one", *steps), pairs=[pairs])
    ddp = train(cfg_for(tiny_model, tmp_path / "ddp", *steps, "train.num_workers=2"), pairs=[pairs])
    fsdp = train(cfg_for(tiny_model, tmp_path / "fsdp", *steps, "train.num_workers=2", "train.strategy=fsdp",
                         "train.activation_checkpointing=full"), pairs=[pairs])
    a = metrics(tmp_path / "one")
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and len(a) == 4
    w0 = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    wa = AutoModelForCausalLM.from_pretrained(one.model).state_dict()
    assert set(wa) == set(w0)
    moved = {k for k in w0 if not torch.equal(wa[k], w0[k])}
    assert moved == {f"model.layers.{i}.{m}.weight" for i in range(2)
                     for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    for run in (ddp, fsdp):
        b = metrics(os.path.dirname(os.path.dirname(run.model)))
        assert len(b) == 4
        for x, y in zip(a, b):
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        wb = AutoModelForCausalLM.from_pretrained(run.model).state_dict()
        assert sorted(os.listdir(one.model)) == sorted(os.listdir(run.model))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_bf16_mixed_precision_starts_at_ln2(tiny_model, pairs, tmp_path):
    """train.dtype=bfloat16 (FSDP2 MixedPrecisionPolicy, DDP as replicate-only FSDP2) on pairs made at the default
    precision: the reference pass computes in bf16 like the step, so step 1's loss is ln 2 (it was ln 2 + 1.6e-3 when
    the reference's precision was fixed when the pairs were made). LoRA: the frozen base held in bf16 (no fp32 master
    copy), the fp32 adapters all-gathered in bf16."""
    fp32 = None
    for name, extra in [("fp32", []), ("ddp", ["train.dtype=bfloat16"]),
                        ("fsdp", ["train.dtype=bfloat16", "train.num_workers=2", "train.strategy=fsdp"]),
                        ("lora", ["train.dtype=bfloat16", "train.num_workers=2", "train.strategy=fsdp",
                                  "train.lora.r=4"])]:
        train(cfg_for(tiny_model, tmp_path / name, "train.lr=1e-4", "train.epochs=1", "train.micro_batch_size=2",
                      *extra), pairs=[pairs])
        ref = records.read_table(str(tmp_path / name / "iter_0" / "reference"))
        first = metrics(tmp_path / name)[0]
        if name == "fp32":
            fp32 = ref
            continue
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4), name
        assert abs(first["rewards/margins"]) < 1e-4, name
        assert ref.column("ref_logp_real") != fp32.column("ref_logp_real")  # computed in bf16, not fp32


def test_trained_model_serves_as_the_next_opponent(tiny_model, pairs, tmp_path):
    result = train(cfg_for(tiny_model, tmp_path, "train.lr=1e-3", "train.epochs=1"), pairs=[pairs])
    # The next iteration's generation (vLLM engine) loads θ_1 from its HF folder.
    nxt = make_pairs(SpinConfig.load(None, [f"model={result.model}", f"storage={tmp_path}", "iteration=1",
                                            "resources=cpu", "data.max_rows=8", "generate.max_tokens=8",
                                            "generate.backend=vllm", "generate.num_cpus_per_actor=0.5",
                                           ]))
    assert nxt.rows == 8 and set(pq.read_table(nxt.path).column("iteration").to_pylist()) == {1}


def test_resume_after_the_run_is_killed(tiny_model, pairs, tmp_path):
    """A killed `spin-ray train` continues from its last checkpoint: steps neither repeat nor go missing."""
    os.makedirs(tmp_path / "iter_0")
    os.symlink(pairs, tmp_path / "iter_0" / "pairs")
    cmd = [sys.executable, "-m", "spin_ray.cli", "train", *sum((["--set", s] for s in
           [f"model={tiny_model}", f"storage={tmp_path}", *FAST, "train.lr=1e-3", "train.epochs=40",
            "train.checkpoint_every=10", "train.report_every=1"]), [])]
    lines_path = tmp_path / "iter_0" / "train_metrics.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (lines_path.exists() and len(lines_path.read_text().splitlines()) >= 25):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = lines_path.read_text().splitlines()
    assert 25 <= len(before) < 160, "the run finished or never started before the kill"
    reference = (tmp_path / "iter_0" / "reference" / records.MARKER).read_text()
    # A metrics line is written before that step's checkpoint is reported, so the line after it proves the report.
    saved = (len(before) - 1) // 10 * 10
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in lines_path.read_text().splitlines()]
    assert steps == list(range(1, 161))
    # It resumed rather than restarted: the checkpointed steps' lines (with their timings) are the first run's.
    assert lines_path.read_text().splitlines()[:saved] == before[:saved]
    assert records.is_complete(str(tmp_path / "iter_0" / "model"))
    # The reference pass ran once: the restart read its stored log-probs (the marker records the pass's own time).
    assert (tmp_path / "iter_0" / "reference" / records.MARKER).read_text() == reference


def test_bad_input_is_refused_before_workers_start(tiny_model, pairs, tmp_path):
    bad = tmp_path / "bad"
    os.makedirs(bad)
    pq.write_table(pq.read_table(pairs).drop(["generated_ids"]), bad / "part.parquet")
    (bad / records.MARKER).write_text("{}")
    with pytest.raises(ConfigError, match=r"lack column\(s\) \['generated_ids'\]"):
        train(cfg_for(tiny_model, tmp_path), pairs=[str(bad)])
    with pytest.raises(ConfigError, match=r"train.num_workers = 8 needs 8 CPU"):
        train(cfg_for(tiny_model, tmp_path, "train.num_workers=8", "train.micro_batch_size=1"), pairs=[pairs])
    with pytest.raises(ConfigError, match="no finished pairs"):
        train(cfg_for(tiny_model, tmp_path, "iteration=3"))
    with pytest.raises(ConfigError, match="train.beta"):
        cfg_for(tiny_model, tmp_path, "train.beta=0")
    assert not os.path.exists(tmp_path / "iter_0" / "model")


def test_generate_then_train_compose_at_iteration_1(tiny_model, pairs, tmp_path):
    """`spin-ray generate` (t=1, model θ_1) then `spin-ray train` (t=1) score both iterations' pairs under θ_1 (the
    reference pass) and train with iteration 1's β and lr, as `spin-ray run` does."""
    os.makedirs(tmp_path / "iter_0")
    os.symlink(pairs, tmp_path / "iter_0" / "pairs")
    common = [f"storage={tmp_path}", *FAST, "loop.window=2", "train.epochs=1", "data.max_rows=32",
              "generate.max_tokens=12", "generate.num_cpus_per_actor=0.5",
              "train.beta_per_iteration=[1.0, 2.5]", "train.lr_per_iteration=[1e-3, 2e-4]"]

    def cli(command, *sets):
        cmd = [sys.executable, "-m", "spin_ray.cli", command, *sum((["--set", s] for s in [*common, *sets]), [])]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    cli("train", f"model={tiny_model}")
    theta1 = str(tmp_path / "iter_0" / "model")
    assert {m["beta"] for m in metrics(tmp_path, 0)} == {1.0}
    cli("generate", f"model={theta1}", "iteration=1")
    cli("train", f"model={theta1}", "iteration=1")
    assert records.is_complete(str(tmp_path / "iter_1" / "model"))
    ref0 = records.read_table(str(tmp_path / "iter_0" / "reference"))
    ref1 = records.read_table(str(tmp_path / "iter_1" / "reference"))
    assert ref1.num_rows == 64 and sorted(set(ref1.column("iteration").to_pylist())) == [0, 1]
    older = ref1.filter(pc.equal(ref1.column("iteration"), 0))
    assert older.column("prompt_id") == ref0.column("prompt_id")
    assert older.column("ref_logp_real") != ref0.column("ref_logp_real")  # iteration 0's pairs under θ_1, not θ_0
    lines = metrics(tmp_path, 1)
    assert len(lines) == 8  # (32 + 32 pairs) / 8 per step
    assert {m["beta"] for m in lines} == {2.5} and max(m["lr"] for m in lines) == pytest.approx(2e-4)
    # θ_1 is the reference of both iterations' pairs: at step 0 the policy's rewards on both answers are 0 (the loss is
    # ln 2 plus the embedded default's SFT term, whatever its weight).
    assert lines[0]["rewards/real"] == pytest.approx(0, abs=1e-3)
    assert lines[0]["rewards/generated"] == pytest.approx(0, abs=1e-3)


def test_checkpoint_cadence():
    from spin_ray.config import TrainConfig
    from spin_ray.stages.train import checkpoint_due

    # 10 steps in all, 4 per epoch; never after the last step (step index 9), whose result is the exported model.
    steps = TrainConfig(checkpoint_every=3, checkpoint_every_minutes=None)
    assert [s for s in range(10) if checkpoint_due(steps, s, 4, 10, 0.0)] == [2, 5, 8]
    epochs = TrainConfig(checkpoint_every=None, checkpoint_every_minutes=None, checkpoint_every_epoch=True)
    assert [s for s in range(10) if checkpoint_due(epochs, s, 4, 10, 0.0)] == [3, 7]
    minutes = TrainConfig(checkpoint_every=None, checkpoint_every_minutes=30.0)
    assert not checkpoint_due(minutes, 0, 4, 10, 29.9) and checkpoint_due(minutes, 0, 4, 10, 30.0)
    assert not checkpoint_due(minutes, 9, 4, 10, 60.0)


def test_sharded_state_resumes_exactly_and_is_read_without_running_code(tiny_model, tmp_path):
    """The DCP state (model, optimizer, scheduler, RNG) round-trips bit for bit; DCP's own reader would unpickle the
    `.metadata` index with pickle.load and non-tensor entries with torch.load(weights_only=False)."""
    import io
    import pickle

    from spin_ray.models.loading import load_model
    from spin_ray.training.checkpoint import _safe_planner, load_state, save_state

    def make():
        model = load_model(tiny_model, dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))

    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(model, optimizer, scheduler):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    a = make()
    for _ in range(2):
        step(*a)
    save_state(*a, step=2, rank=0, out=str(tmp_path))
    b = make()
    assert load_state(str(tmp_path / STATE), *b, rank=0) == 2
    assert b[2].state_dict() == a[2].state_dict()
    step(*a)
    step(*b)
    assert all(torch.equal(x, y) for x, y in zip(a[0].parameters(), b[0].parameters()))

    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    (tmp_path / STATE / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(BaseException, match="CheckpointException"):  # DCP wraps the refusal in its own exception
        load_state(str(tmp_path / STATE), *b, rank=0)
    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        _safe_planner().load_bytes(None, buffer)
    assert not witness.exists()


def test_workers_read_only_their_rows_from_storage(pairs, tmp_path):
    from spin_ray.training.batching import epoch_plan, plan_steps
    from spin_ray.stages.train import index_pairs, load_share, packed_lengths

    columns = ["iteration", "prompt_id", *schemas.IDS]
    table = records.read_table(pairs).sort_by("prompt_id").select(columns)  # the training table, in prompt-id order
    # The driver's index: keys in the table's order, lengths from the stored pair_tokens (no token ids read).
    index, keys = index_pairs([pairs])
    assert keys.column("prompt_id").to_pylist() == table.column("prompt_id").to_pylist()
    assert index.lengths.tolist() == packed_lengths(table).tolist()
    lengths = index.lengths.tolist()
    steps = plan_steps(table.num_rows, 8, 2)
    order, plan = epoch_plan(lengths, steps, 42, 0, 2)
    mine = [sorted(i for shares in plan for i in shares[rank]) for rank in range(2)]
    # Each step's global batch is split between the two workers; together they hold each row once.
    assert [sorted(a + b) for a, b in plan] == [sorted(order[8 * k:8 * k + 8]) for k in range(len(steps))]
    assert sorted(mine[0] + mine[1]) == list(range(table.num_rows)) and len(mine[0]) == table.num_rows // 2
    share = load_share(index, mine[1])
    assert len(share) == len(mine[1]) and len(share.ids["real_ids"][0]) < len(table.column("real_ids").combine_chunks().values)
    for row in mine[1]:
        assert share.pair(row) == {k: table.column(k)[row].as_py() for k in schemas.IDS}

    # Pairs written before the pair_tokens column, in two files of several row groups each, not in prompt-id order:
    # the same rows, lengths and shares.
    old = tmp_path / "old_pairs"
    old.mkdir()
    shuffled = table.take(list(reversed(range(table.num_rows))))
    half = table.num_rows // 2
    pq.write_table(shuffled.slice(0, half), old / "a.parquet", row_group_size=5)
    pq.write_table(shuffled.slice(half), old / "b.parquet", row_group_size=3)
    (old / records.MARKER).write_text("{}")
    index2, keys2 = index_pairs([str(old)])
    assert keys2 == keys and index2.lengths.tolist() == lengths and len(index2.files) == 2
    share2 = load_share(index2, mine[0])
    for row in mine[0]:
        assert share2.pair(row) == {k: table.column(k)[row].as_py() for k in schemas.IDS}


def test_model_is_exported_in_its_own_dtype(tiny_model, pairs, tmp_path):
    """A bf16 θ_t gives a bf16 θ_{t+1} (trained on fp32 master weights), with the epoch checkpoint cadence on."""
    from safetensors import safe_open

    from spin_ray.models.loading import load_model

    bf16 = tmp_path / "bf16_model"
    load_model(tiny_model, dtype=torch.bfloat16).save_pretrained(bf16)
    for name in os.listdir(tiny_model):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            os.link(os.path.join(tiny_model, name), bf16 / name)
    result = train(cfg_for(str(bf16), tmp_path, "train.epochs=2", "train.checkpoint_every=null",
                           "train.checkpoint_every_epoch=true"), pairs=[pairs])
    assert json.loads((tmp_path / "iter_0" / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(os.path.join(result.model, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 9))
