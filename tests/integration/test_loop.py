"""The self-play loop end to end on real Ray, vLLM (CPU) and Ray Train, with the tiny model."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.data import records
from spin_ray.data.layout import RunLayout
from spin_ray.stages.loop import model_path, run, run_iteration
from spin_ray.training.batching import plan_steps

pytestmark = pytest.mark.integration

TINY = ["data.max_rows=16", "data.max_length=128", "data.max_prompt_length=64", "generate.max_tokens=8",
        "generate.batch_size=8", "generate.num_cpus_per_actor=0.5",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.optimizer=adamw", "train.beta=1.0",
        "train.lr=1e-3", "train.epochs=1", "train.report_every=1", "loop.iterations=2", "loop.window=2", "eval.rows=8"]


def cfg_for(model, storage, *extra):
    return SpinConfig.load(None, [f"model={model}", f"storage={storage}", *TINY, *extra])


def lines(storage, t):
    with open(os.path.join(storage, f"iter_{t}", "train_metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def engines():
    """Every generation engine the test cluster has started (alive or not), by actor id: the loop's own (Generator)
    and Ray Data's (MapWorker(MapBatches(Generator))); not the forwarding PooledGenerator actors."""
    from ray._private import state

    return {i for i, a in state.actors().items()
            if a["ActorClassName"] == "Generator" or a["ActorClassName"].endswith("(Generator))")}


def test_two_iterations_end_to_end(tiny_model, ray_cluster, tmp_path):
    seen, started = [], engines()
    t0 = time.perf_counter()
    results = run(cfg_for(tiny_model, tmp_path), on_iteration=seen.append)
    wall = time.perf_counter() - t0
    assert [r.iteration for r in results] == [0, 1] and seen == results
    # The phases are disjoint spans of this call: together they fit in its wall time, the reference pass inside
    # training. Each iteration starts its own engines (no keep_warm), which takes vLLM seconds, not microseconds.
    phases = [{k: r.seconds[k] for k in ("engines", "pairs", "train", "eval")} for r in results]
    assert sum(sum(p.values()) for p in phases) <= wall, (phases, wall)
    assert all(r.seconds["reference"] <= r.seconds["train"] for r in results)
    assert all(p["engines"] > 1.0 and p["pairs"] > 0.1 and p["train"] > 1.0 for p in phases), phases
    # One engine start per iteration serves its pairs and its θ_t's held-out answers; θ_2's evaluation starts one more.
    assert len(engines() - started) == 3
    it0, it1 = (os.path.join(tmp_path, f"iter_{t}") for t in (0, 1))
    assert results[0].model == os.path.join(it0, "model") and results[1].model == os.path.join(it1, "model")
    # θ_1 generated iteration 1's pairs; θ_1's reference pass scored them and iteration 0's (the window).
    p0, p1 = pq.read_table(os.path.join(it0, "pairs")), pq.read_table(os.path.join(it1, "pairs"))
    r0, r1 = (records.read_table(os.path.join(it, "reference")) for it in (it0, it1))
    assert p0.num_rows == p1.num_rows == r0.num_rows == 16 and r1.num_rows == 32
    assert set(p1.column("iteration").to_pylist()) == {1}
    older = r1.filter(pc.equal(r1.column("iteration"), 0))
    assert older.column("prompt_id") == r0.column("prompt_id")
    assert older.column("ref_logp_real") != r0.column("ref_logp_real")  # under θ_1, not θ_0
    # Both iterations start at ln 2: the reference is θ_t for all of the window's pairs.
    assert [len(lines(tmp_path, t)) for t in (0, 1)] == [2, 4]  # 16 then 32 pairs, 8 per step
    for t in (0, 1):
        assert lines(tmp_path, t)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in lines(tmp_path, t))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["stages"].items()} == {"iter_0": "done", "iter_1": "done"}
    # θ_0, θ_1 and θ_2 are evaluated on the same held-out prompts; each iterate against the one before it.
    evals = [RunLayout(str(tmp_path)).evaluation(k) for k in range(3)]
    assert [e["theta"] for e in evals] == [0, 1, 2] and all(e["rows"] == 8 for e in evals)
    assert evals[0]["reward_accuracy"] is None and all(0 <= e["reward_accuracy"] <= 1 for e in evals[1:])
    assert [r.evaluation for r in results] == evals[1:] and results[0].evaluation_before == evals[0]
    assert all(e["task_score"] is not None and math.isfinite(e["nll_per_token"]) for e in evals)
    # The report: one row per model, and plots with content.
    from spin_ray.tools.report import write_report

    report = write_report(str(tmp_path))
    text = open(report).read()
    assert "| θ_0 (start) |" in text and "| θ_1 (iter_0) |" in text and "| θ_2 (iter_1) **kept** (last) |" in text
    for k in (1, 2):
        assert f"{evals[k]['reward_accuracy']:.3f}" in text
    assert all(os.path.getsize(tmp_path / f) > 5000 for f in ("report_training.png", "report_eval.png"))
    cli = subprocess.run(spin_ray_cli("report", str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "| θ_2 (iter_1) **kept** (last) |" in cli.stdout and report in cli.stdout, cli.stderr[-2000:]
    # The engines' busy time, parsed from Ray Data's stats (a stats line the parser misses leaves no key).
    assert all(r.seconds["generate"] > 0 for r in results), [r.seconds for r in results]

    # The same command again redoes nothing; another config is refused unless forced.
    mtimes = {f: os.path.getmtime(os.path.join(it0, "pairs", f)) for f in os.listdir(os.path.join(it0, "pairs"))}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["selected"] == {"theta": 2, "model": results[1].model, "rule": "last", "by": None, "value": None}
    # loop.select = best (not part of the config's identity: nothing is redone) keeps the best held-out iterate.
    # So is tracking, which mirrors what the stages wrote into a tracker run (here TensorBoard event files).
    again = run(cfg_for(tiny_model, tmp_path, "loop.select=best", "tracking.backend=tensorboard"))
    assert [r.pairs.skipped for r in again] == [True, True] and [r.model for r in again] == [r.model for r in results]
    best = max(range(3), key=lambda k: (evals[k]["task_score"], -evals[k]["nll_per_token"], -k))
    kept = json.loads((tmp_path / "manifest.json").read_text())["selected"]
    assert (kept["theta"], kept["rule"], kept["by"], kept["value"]) == (best, "best", "task_score",
                                                                        evals[best]["task_score"])
    assert kept["model"] == ([model_path(None, cfg_for(tiny_model, tmp_path))] + [r.model for r in results])[best]
    from conftest import tensorboard_scalars

    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    steps = lines(tmp_path, 0) + lines(tmp_path, 1)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, len(steps) + 1))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([m["loss"] for m in steps], rel=1e-6)
    assert [s for s, _ in scalars["eval/task_score"]] == [0, 1, 2]
    assert [v for _, v in scalars["eval/task_score"]] == pytest.approx([e["task_score"] for e in evals], rel=1e-6)
    assert {f: os.path.getmtime(os.path.join(it0, "pairs", f)) for f in mtimes} == mtimes
    with pytest.raises(ConfigError, match="another config_hash.*--force"):
        run(cfg_for(tiny_model, tmp_path, "train.beta=2.0"))
    assert len(run(cfg_for(tiny_model, tmp_path, "train.beta=2.0"), force=True)) == 2


def test_library_api_inside_a_running_ray_program(tiny_model, ray_cluster, tmp_path):
    import ray
    import ray.data
    import ray.train

    rows = [{"messages": [{"role": "user", "content": f"Reverse the letters: {w}"},
                          {"role": "assistant", "content": w[::-1]}]} for w in ["abc", "hello", "ray", "spin"] * 2]
    rows[4]["messages"][0]["content"] += "!"  # no duplicates
    rows[5]["messages"][0]["content"] += "!"
    rows[6]["messages"][0]["content"] += "!"
    rows[7]["messages"][0]["content"] += "!"
    cfg = cfg_for(tiny_model, tmp_path, "loop.iterations=1", "eval.enabled=false")  # evaluation: its own tests
    checkpoint = ray.train.Checkpoint.from_directory(tiny_model)
    result = run_iteration(cfg, ray.data.from_items(rows), model=checkpoint)
    assert ray.is_initialized()
    assert isinstance(result.checkpoint, ray.train.Checkpoint)
    assert os.path.exists(os.path.join(result.checkpoint.path, "model.safetensors"))
    pairs = result.pairs.dataset()
    assert isinstance(pairs, ray.data.Dataset) and pairs.count() == 8
    assert {r["real"] for r in pairs.take_all()} == {w[::-1] for w in ["abc", "hello", "ray", "spin"]}
    assert result.metrics["step"] == 1


def test_library_callers_get_the_cli_checks_before_any_actor(tiny_model, ray_cluster, tmp_path):
    # Storage that is a file, and a model folder whose weights are pickle only: the Python API refuses both in one
    # paragraph before a stage starts, as the CLI does, and writes nothing.
    import shutil

    storage = tmp_path / "runs"
    storage.write_text("keep")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run(cfg_for(tiny_model, storage))
    assert storage.read_text() == "keep"
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="holds only pickle weights"):
        run_iteration(cfg_for(str(model), tmp_path / "store", "eval.enabled=false"))


def test_early_stop_reads_the_measured_fixed_point(tiny_model, ray_cluster, tmp_path):
    # One real iteration: θ_1 really differs from θ_0, so its held-out reward accuracy is a measurement, not 0.5.
    first = run(cfg_for(tiny_model, tmp_path, "loop.iterations=1"))
    accuracy = RunLayout(str(tmp_path)).evaluation(1)["reward_accuracy"]
    assert first[0].evaluation["reward_accuracy"] == accuracy
    distance = abs(accuracy - 0.5)
    # Stops before iteration 1 exactly when that measurement is within ε of 0.5.
    stopped = run(cfg_for(tiny_model, tmp_path, f"loop.early_stop_epsilon={max(distance, 1e-3)}"), force=True)
    assert len(stopped) == 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["iter_1"]["status"] == "stopped"
    assert manifest["stages"]["iter_1"]["heldout_accuracy"] == accuracy


def spin_ray_cli(*args):
    return [sys.executable, "-m", "spin_ray.cli", *args]


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_resume_after_kills_inside_and_between_stages(tiny_model, ray_cluster, tmp_path):
    # loop.window=1: iteration 1 trains on its own pairs only (the window's reference is test_faults.py's).
    sets = [f"model={tiny_model}", f"storage={tmp_path}", *TINY, "train.epochs=20", "train.checkpoint_every=10",
            "loop.window=1"]
    cmd = spin_ray_cli("run", *sum((["--set", s] for s in sets), []))
    metrics0 = tmp_path / "iter_0" / "train_metrics.jsonl"

    # Kill 1: inside iteration 0's training (40 steps), after a checkpoint.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    assert wait_for(lambda: metrics0.exists() and len(metrics0.read_text().splitlines()) >= 25)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = metrics0.read_text().splitlines()
    pairs0 = {f: os.path.getmtime(tmp_path / "iter_0" / "pairs" / f) for f in os.listdir(tmp_path / "iter_0" / "pairs")}

    # Kill 2: between stages of iteration 1 (θ_1 is saved, iteration 1 is generating).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    assert wait_for(lambda: records.is_complete(str(tmp_path / "iter_0" / "model")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = (len(before) - 1) // 10 * 10
    steps = [json.loads(line)["step"] for line in metrics0.read_text().splitlines()]
    assert steps == list(range(1, 41)) and metrics0.read_text().splitlines()[:saved] == before[:saved]
    assert {f: os.path.getmtime(tmp_path / "iter_0" / "pairs" / f) for f in pairs0} == pairs0
    for t in (0, 1):
        ids = pq.read_table(tmp_path / f"iter_{t}" / "pairs").column("prompt_id").to_pylist()
        assert len(ids) == len(set(ids)) == 16
    assert [json.loads(line)["step"] for line in (tmp_path / "iter_1" / "train_metrics.jsonl").read_text()
            .splitlines()] == list(range(1, 41))
    # The last screen, for people: θ_0..θ_2 with θ_2 kept at its folder, the report, the time split by phase.
    screen = done.stdout[done.stdout.index("iteration 1: θ_2 saved"):].splitlines()
    assert [line.split()[0] for line in screen if line.lstrip("* ").startswith("θ_")][-3:] == ["θ_0", "θ_1", "*"]
    kept = os.path.join(str(tmp_path), "iter_1", "model")
    assert f"kept (*): θ_2 (loop.select = last) at {kept}" in screen and screen[-2] == f"report: {tmp_path}/report.md"
    assert re.fullmatch(r"total \d+\.\d s: engine start \d+\.\d, generation \d+\.\d, training \d+\.\d, "
                        r"of which reference \d+\.\d, evaluation \d+\.\d; Ray start, data and report \d+\.\d",
                        screen[-1]), screen[-1]
    assert not any(line.startswith(("{", '"')) for line in done.stdout.splitlines())  # the object is behind --json
    # The terminal gets progress, the table and the report; Ray's, vLLM's and the workers' logs go to the file.
    assert "full log in" in done.stdout and "report:" in done.stdout
    # Every step line is one of iteration 1's optimizer steps (iteration 0 was finished before this run), each once
    # and in order, out of as many as the config makes: 16 pairs in global batches of 8, 20 epochs. Each is stamped
    # with the step's own time, before θ_2's "saved" line.
    cfg = SpinConfig.load(None, sets)
    total = len(plan_steps(16, cfg.train.global_batch_size, cfg.train.num_workers)) * cfg.train.epochs
    lines = done.stdout.splitlines()
    saved_at = next(i for i, line in enumerate(lines) if "iteration 1: θ_2 saved" in line)
    step_lines = [(i, line) for i, line in enumerate(lines) if "train step" in line]
    assert [re.search(r"iteration (\d+): train step (\d+)/(\d+) ", line).groups() for _, line in step_lines] == [
        ("1", str(k), str(total)) for k in range(1, total + 1)], [line for _, line in step_lines]
    assert max(i for i, _ in step_lines) < saved_at
    step_times = [time.strftime("%H:%M:%S", time.localtime(json.loads(line)["time"]))
                  for line in (tmp_path / "iter_1" / "train_metrics.jsonl").read_text().splitlines()]
    assert [line.split()[0] for _, line in step_lines] == step_times
    for noise in ("(pid=", "Failed to query", "INFO worker.py", "vllm", "Traceback"):
        assert noise not in done.stdout + done.stderr, noise
    log_file = done.stdout.split("full log in ")[1].split()[0]
    assert "(pid=" in open(log_file).read() or "vllm" in open(log_file).read().lower()


def test_cli_user_errors_are_one_paragraph(tmp_path):
    for args, needle in [(["--set", "train.beta=0"], "train.beta = 0"),
                         (["--set", "model=/no/such/model", "--set", f"storage={tmp_path}"], "/no/such/model"),
                         (["--config", str(tmp_path / "missing.yaml")], "missing.yaml")]:
        out = subprocess.run(spin_ray_cli("generate", *args), capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_warm_engines_take_the_new_weights(tiny_model, ray_cluster, tmp_path):
    from spin_ray.stages.loop import make_pairs

    greedy = ["generate.temperature=0", "generate.keep_warm=true", "generate.num_actors=1"]
    results = run(cfg_for(tiny_model, tmp_path / "warm", *greedy))
    # A fresh engine loaded from θ_1 answers exactly as the warm engine did after the in-place reload.
    fresh = make_pairs(cfg_for(results[0].model, tmp_path / "fresh", *greedy, "iteration=1"))
    warm = pq.read_table(tmp_path / "warm" / "iter_1" / "pairs").to_pylist()
    cold = {r["prompt_id"]: r["generated"] for r in pq.read_table(fresh.path).to_pylist()}
    assert {r["prompt_id"]: r["generated"] for r in warm} == cold
    before = {r["prompt_id"]: r["generated"] for r in pq.read_table(tmp_path / "warm" / "iter_0" / "pairs").to_pylist()}
    assert before != cold  # θ_1 answers differently from θ_0, so the comparison above can fail


def test_two_lora_iterations_each_start_from_the_merged_theta_t(tiny_model, ray_cluster, tmp_path):
    """train.lora in the loop: θ_1 is exported merged (a plain HF folder that vLLM generates iteration 1's answers
    from and whose reference pass scores iteration 1's pairs), so iteration 1 starts at ln 2 again and its adapters sit
    on θ_1: θ_2 − θ_1 has rank <= r in every adapted matrix (on θ_0, the known trap, it would not)."""
    import torch
    from safetensors.torch import load_file

    targets = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    results = run(cfg_for(tiny_model, tmp_path, "train.lora.r=4", "train.lora.alpha=8",
                          "train.lora.target_modules=[q_proj, v_proj, down_proj]", "generate.backend=vllm",
                          "eval.enabled=false"))
    assert [r.iteration for r in results] == [0, 1]
    assert pq.read_table(os.path.join(tmp_path, "iter_1", "pairs")).num_rows == 16  # vLLM loaded θ_1
    for t in (0, 1):
        assert lines(tmp_path, t)[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    thetas = [load_file(os.path.join(m, "model.safetensors")) for m in (tiny_model, *(r.model for r in results))]
    for r in results:
        assert not [f for f in os.listdir(r.model) if "adapter" in f]
    adapted = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in targets}
    for before, after in zip(thetas, thetas[1:]):
        assert set(after) == set(before)
        assert {k for k in before if not torch.equal(before[k], after[k])} == adapted
        for k in adapted:
            s = torch.linalg.svdvals((after[k] - before[k]).double())
            assert s[4] < 1e-4 * s[0], k
