"""spin_ray as a step of a user's own Ray program: the README's library example, run as written in a plain Ray
program with none of spin_ray's environment set, and the composable stages (a pairs Dataset into train)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What the CLI used to export for its own runs; a user's program has none of it.
SPIN_RAY_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "TOKENIZERS_PARALLELISM",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

pytestmark = pytest.mark.integration


def readme_example() -> str:
    """The first python block of README.md's "As a library" section."""
    section = (ROOT / "README.md").read_text().split("## As a library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_library_example_runs_as_written_in_a_plain_ray_program(ray_cluster, tmp_path):
    import ray

    script = tmp_path / "pipeline.py"
    script.write_text(readme_example())
    storage = Path("/tmp/spin-pipeline")  # the example's own storage
    subprocess.run(["rm", "-rf", str(storage)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in SPIN_RAY_ENV}
    # As `ray job submit` does: the program's ray.init() joins the running cluster named by RAY_ADDRESS.
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    # Ray Train's controller and its placement-group cleaner are Ray's actors, started by Ray Train for the job, so
    # their output reaches the driver whatever spin_ray does; on a loaded test machine stopping the cleaner times out
    # and the controller logs Ray's traceback for it. Those lines are Ray's, and they name their actor.
    ray_train = ("(PlacementGroupCleaner pid=", "(TrainController pid=")
    seen = [line for line in (out.stdout + out.stderr).splitlines() if not any(a in line for a in ray_train)]
    assert out.returncode == 0, "\n".join(seen[-60:])
    assert re.search(r"\d+ of \d+ answers ended by the model; θ_1 at .*iter_0/model", out.stdout), out.stdout
    # The caller's screen: spin_ray's progress, not the engines' or workers' internals (those are in the run's logs).
    assert len(seen) <= 40, "\n".join(seen)
    assert not any("non-default args" in line or "Loading safetensors" in line for line in seen)
    # Ray Data's INFO lines: none for spin_ray's own executions and writes, one for the caller's `.count()`.
    assert not any("Data sink" in line for line in seen)
    assert sum("execution finished" in line for line in seen) == 1, "\n".join(seen)
    # The held-out prompts are prepared once (fresh storage): each θ's evaluation reads them without a second line.
    assert sum("prompts_eval" in line for line in seen) == 1 and "reusing them" not in out.stdout + out.stderr, seen
    logs = list((storage / "logs").glob("engine-*.log"))
    assert logs and any("vllm" in p.read_text().lower() for p in logs)
    assert list((storage / "logs").glob("train-iter0-rank0.log"))


def test_train_takes_a_filtered_pairs_dataset_and_returns_a_checkpoint(ray_cluster, tiny_model, tmp_path):
    """make_pairs → a downstream filter (a Dataset, never collected) → train → a Checkpoint of θ_1 trained on
    exactly the rows that passed."""
    import pyarrow.dataset as pads
    import ray.data
    import ray.train
    from ray.data.expressions import col

    from spin_ray import make_pairs, train
    from spin_ray.config import SpinConfig
    from spin_ray.data.sources import BUNDLED

    cfg = SpinConfig.load(None, [f"model={tiny_model}", f"storage={tmp_path}", "data.max_rows=24",
                                 "data.max_length=128", "data.max_prompt_length=64", "generate.max_tokens=8",
                                 "generate.batch_size=8", "generate.num_cpus_per_actor=0.5",
                                 "train.global_batch_size=4", "train.micro_batch_size=4", "eval.enabled=false"])
    rows = ray.data.read_parquet(str(BUNDLED)).filter(expr=col("split") == "train")
    pairs = make_pairs(cfg, rows)
    kept = pairs.dataset().filter(lambda r: len(r["prompt_id"]) > 0 and int(r["prompt_id"][-1], 16) % 2 == 0)
    result = train(cfg, pairs=kept)
    assert isinstance(result.checkpoint, ray.train.Checkpoint)
    assert (Path(result.checkpoint.path) / "config.json").exists()
    given = pads.dataset(str(tmp_path / "iter_0" / "pairs_given"), format="parquet").to_table(columns=["prompt_id"])
    expected = sorted(p for p in pads.dataset(pairs.path, format="parquet").to_table(columns=["prompt_id"])
                      .column("prompt_id").to_pylist() if int(p[-1], 16) % 2 == 0)
    assert sorted(given.column("prompt_id").to_pylist()) == expected and 0 < len(expected) < pairs.rows


def test_pairs_dataset_without_the_training_columns_is_refused(ray_cluster, tiny_model, tmp_path):
    import ray.data

    from spin_ray import train
    from spin_ray.config import ConfigError, SpinConfig

    cfg = SpinConfig.load(None, [f"model={tiny_model}", f"storage={tmp_path}"])
    with pytest.raises(ConfigError, match="no column .*real_ids"):
        train(cfg, pairs=ray.data.from_items([{"prompt_id": "a", "iteration": 0}]))


def test_an_engine_that_cannot_start_is_one_exception_with_its_cause(ray_cluster, tiny_model, tmp_path):
    """A KV cache the node cannot hold: one StageError naming the stage, the cause and the setting, raised once (the
    engine is not restarted), nothing written."""
    from spin_ray import run_iteration
    from spin_ray.config import SpinConfig
    from spin_ray.failures import StageError

    rows = [{"messages": [{"role": "user", "content": f"Reverse the letters: ab{i}"},
                          {"role": "assistant", "content": f"{i}ba"}]} for i in range(8)]
    import ray.data

    cfg = SpinConfig.load(None, [f"model={tiny_model}", f"storage={tmp_path}", "data.max_length=128",
                                 "data.max_prompt_length=64", "generate.num_cpus_per_actor=0.5",
                                 "generate.max_tokens=8", "generate.cpu_kv_cache_gb=100000", "eval.enabled=false"])
    with pytest.raises(StageError) as caught:
        run_iteration(cfg, prompts=ray.data.from_items(rows))
    message = str(caught.value)
    assert message.startswith("generation failed: vLLM could not reserve 100000 GiB of host memory for its KV cache")
    assert "generate.cpu_kv_cache_gb" in message and "\n" not in message
    assert not (tmp_path / "iter_0" / "pairs").exists()


def test_bad_upstream_rows_are_refused_before_any_engine_starts(ray_cluster, tiny_model, tmp_path):
    import ray.data
    import ray.util.state

    from spin_ray import run_iteration
    from spin_ray.config import ConfigError, SpinConfig

    good = {"messages": [{"role": "user", "content": "Sort the letters: cba"}, {"role": "assistant", "content": "abc"}]}
    bad = {"messages": [{"role": "assistant", "content": "Sort the letters: cba"}, {"role": "user", "content": "abc"}]}
    cfg = SpinConfig.load(None, [f"model={tiny_model}", f"storage={tmp_path}", "data.max_length=128",
                                 "data.max_prompt_length=64", "generate.max_tokens=8", "eval.enabled=false"])
    engines = len(ray.util.state.list_actors(filters=[("class_name", "=", "Generator")]))
    with pytest.raises(ConfigError, match=r"a row of .*role"):
        run_iteration(cfg, prompts=ray.data.from_items([good, bad]))
    assert len(ray.util.state.list_actors(filters=[("class_name", "=", "Generator")])) == engines
