"""Which Ray cluster a command uses, and what happens when it goes away: the real CLI in subprocesses on long-lived
clusters started with the real `ray start` (conftest.RayHead), found through Ray's address file as a user's would be."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from spin_ray.data import records

pytestmark = pytest.mark.integration

# 16 pairs, 2 steps per epoch, 20 epochs: training lasts long enough to be interrupted in the middle.
TINY = ["data.max_rows=16", "data.max_length=128", "data.max_prompt_length=64", "generate.max_tokens=8",
        "generate.batch_size=8", "generate.num_cpus_per_actor=0.5",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.epochs=8", "train.report_every=1",
        "train.checkpoint_every=1000", "eval.enabled=false", "loop.iterations=1"]

PLACEMENT_GROUPS = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps([pg["state"] for pg in ray.util.placement_group_table().values()]))
"""


def run_cmd(model, storage):
    sets = [f"model={model}", f"storage={storage}", *TINY]
    return [sys.executable, "-m", "spin_ray.cli", "run", *sum((["--set", s] for s in sets), [])]


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def training(storage, proc):
    """Until this command writes its first training step (or ends)."""
    metrics, started = storage / "iter_0" / "train_metrics.jsonl", time.time()
    assert wait_for(lambda: proc.poll() is not None or (
        metrics.exists() and metrics.stat().st_mtime > started and metrics.read_text().strip())), \
        "training did not start in 300 s"
    assert proc.poll() is None, f"the command ended before training was interrupted: {proc.communicate()}"


def test_a_command_finds_a_ray_start_cluster_says_so_and_resumes_after_it_goes_away(ray_head, tiny_model, tmp_path):
    ray_head.start()
    storage = tmp_path / "run"
    cmd = run_cmd(tiny_model, storage)

    # 1. The driver killed mid-training: the cluster outlives it, and Ray frees the run's placement group.
    proc = subprocess.Popen(cmd, env=ray_head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    training(storage, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    first_line = proc.communicate()[0].splitlines()[0]
    # Ray's address file names the head by the machine's address, whichever interface it listens on.
    assert re.search(rf"joining the Ray cluster at [\d.]+:{ray_head.port} \(named by `ray start`", first_line), first_line

    def placement_groups():
        out = subprocess.run([sys.executable, "-c", PLACEMENT_GROUPS, ray_head.address], env=ray_head.env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert wait_for(lambda: all(s == "REMOVED" for s in placement_groups()), timeout=120), placement_groups()
    assert placement_groups(), "no placement group was ever made: training was not reached"
    pairs = storage / "iter_0" / "pairs"
    assert records.is_complete(str(pairs)) and not records.is_complete(str(storage / "iter_0" / "model"))
    kept = {f: os.path.getmtime(pairs / f) for f in os.listdir(pairs)}

    # 2. The same command again, and the cluster stopped under it mid-training: one paragraph, exit 1, promptly.
    proc = subprocess.Popen(cmd, env=ray_head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    training(storage, proc)
    ray_head.stop()
    out, err = proc.communicate(timeout=120)
    # Ended by spin_ray's own paragraph (the watch or the handler), not by Ray's bare exit after a minute's wait.
    assert proc.returncode == 1, (out[-2000:], err[-2000:])
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one paragraph
    assert re.search(rf"The Ray cluster at [\d.]+:{ray_head.port} \(named by `ray start`", err), err
    assert "went away while: iteration 0: train" in err, err
    assert f"Finished stages are kept under {storage}; rerun the same command to resume" in err, err
    log = sorted((storage / "logs").glob("run-*.log"))[-1]  # the command's own log, beside the engines' and workers'
    assert f"Details in {log}." in err
    # Ray's placement-group cleaner could query the state API all along (the head runs the dashboard).
    assert "Failed to query Ray Train Controller actor state" not in log.read_text()

    # 3. A new cluster, the same command: finished stages are kept and the iteration completes.
    ray_head.start()
    done = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {f: os.path.getmtime(pairs / f) for f in os.listdir(pairs)} == kept
    assert records.is_complete(str(storage / "iter_0" / "model"))
    steps = [json.loads(line)["step"] for line in (storage / "iter_0" / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


ACTORS = """
import json, sys, ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps([(a.class_name, a.required_resources) for a in list_actors(detail=True, limit=1000)]))
"""


def test_generation_and_training_take_turns_on_every_gpu(ray_head, tiny_model, tmp_path):
    """Two logical GPUs: generation's engines (generate.num_actors auto: one per GPU) and then the Train workers
    (train.num_workers auto: every GPU) each ask for both, so the run only finishes if the engines give the GPUs
    back before training starts. Compute runs on the CPU (Ray's logical GPUs have no CUDA device; the workers'
    process group is gloo)."""
    ray_head.start(num_gpus=2)
    storage = tmp_path / "run"
    sets = [f"model={tiny_model}", f"storage={storage}", *TINY, "train.epochs=1", "resources=gpu",
            "generate.num_actors=auto", "generate.keep_warm=false", "train.num_workers=auto", "train.dist_backend=gloo"]
    out = subprocess.run([sys.executable, "-m", "spin_ray.cli", "run", *sum((["--set", s] for s in sets), [])],
                         env=ray_head.env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    assert records.is_complete(str(storage / "iter_0" / "model"))
    listed = subprocess.run([sys.executable, "-c", ACTORS, ray_head.address], env=ray_head.env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    actors = json.loads(listed.stdout.strip().splitlines()[-1])
    engines = [r for name, r in actors if name == "Generator"]  # the engines (Ray Data's stage actors forward to them)
    workers = [r for name, r in actors if name == "RayTrainWorker"]


    def gpus(r: dict) -> float:  # a Train worker asks through its placement group: GPU_group_<id>, GPU_group_<i>_<id>
        return max((v for k, v in r.items() if k == "GPU" or k.startswith("GPU_group_")), default=0.0)

    assert len(engines) == 2 and all(gpus(r) == 1 for r in engines), actors
    assert len(workers) == 2 and all(gpus(r) == 1 for r in workers), actors
