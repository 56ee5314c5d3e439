"""Faults injected into real runs (real Ray, the real vLLM CPU engine, Ray Train): real processes and actors are
killed, and every pair is accounted for by prompt id."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from spin_ray.data import records

from spin_ray.cli.main import EMBEDDED
from spin_ray.config import ConfigError, SpinConfig
from spin_ray.data import schemas

pytestmark = pytest.mark.integration

TINY = ["data.max_length=128", "data.max_prompt_length=64", "generate.max_tokens=8", "generate.batch_size=8",
        "generate.num_cpus_per_actor=0.5", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.optimizer=adamw", "train.beta=1.0", "train.lr=1e-3", "train.epochs=1",
        "train.report_every=1", "eval.enabled=false"]


def cfg_for(model, storage, *extra):
    return SpinConfig.load(None, [f"model={model}", f"storage={storage}", *TINY, *extra])


def wait_for(predicate, timeout=300, every=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def in_thread(fn, *args):
    """Run fn(*args) in a thread of this driver, so the test can inject a fault while it runs."""
    out = {}

    def target():
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - the test asserts on it
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def row_hashes(folder) -> dict[str, str]:
    """prompt_id -> content hash of the whole pairs row (every column, in a fixed order)."""
    table = pq.read_table(folder, columns=list(schemas.PAIRS_COLUMNS))
    return {r["prompt_id"]: hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()
            for r in table.to_pylist()}


def test_remote_model_retrained_at_the_same_uri_is_not_served_stale(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from spin_ray.models.loading import local_model

    remote = tmp_path / "bucket" / "model"
    shutil.copytree(tiny_model, remote)
    uri, cache = f"file://{remote}", tmp_path / "cache"
    first = local_model(uri, cache_dir=cache)
    assert open(os.path.join(first, "model.safetensors"), "rb").read() == (remote / "model.safetensors").read_bytes()
    assert local_model(uri, cache_dir=cache) == first  # unchanged: copied once

    # "Re-trained" at the same URI: same file names and sizes (same architecture), other weights, a later mtime.
    weights = load_file(remote / "model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, remote / "model.safetensors", metadata={"format": "pt"})
    later = os.path.getmtime(remote / "config.json") + 10
    os.utime(remote / "model.safetensors", (later, later))
    second = local_model(uri, cache_dir=cache)
    assert second != first
    assert open(os.path.join(second, "model.safetensors"), "rb").read() == (remote / "model.safetensors").read_bytes()
    assert open(os.path.join(first, "model.safetensors"), "rb").read() != (remote / "model.safetensors").read_bytes()


def actors(class_part):
    """Actors of this cluster whose class name contains `class_part`, from the GCS (ray.util.state needs the
    dashboard, which the test cluster does not run)."""
    from ray._private import state

    return [a for a in state.actors().values() if class_part in a["ActorClassName"]]


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_engine_killed_mid_batch_is_replaced_and_the_batch_redone(tiny_model, ray_cluster, tmp_path):
    from spin_ray.data.sources import load_sft
    from spin_ray.stages.loop import make_pairs

    # Few large batches of long answers, so that the engine is inside a batch for a while.
    cfg = cfg_for(tiny_model, tmp_path, "data.max_rows=48", "data.max_length=256", "generate.max_tokens=160",
                  "generate.batch_size=24", "generate.num_actors=1")
    expected = set(load_sft(cfg.data).to_arrow().column("prompt_id").to_pylist())
    thread, out = in_thread(make_pairs, cfg)
    killed = {}

    def kill_inside_a_batch():
        alive = [a for a in actors("Generator") if a["ActorClassName"] == "Generator" and a["State"] == "ALIVE"]
        if not alive:
            return False
        # ALIVE means the engine is loaded; the process burning CPU now means it is generating a batch.
        pid, before = alive[0]["Pid"], cpu_seconds(alive[0]["Pid"])
        time.sleep(0.3)
        if cpu_seconds(pid) - before < 0.1:
            return False
        os.kill(pid, signal.SIGKILL)  # the engine's process dies, as under the OOM killer
        killed.update(actor_id=alive[0]["ActorID"], pid=pid)
        return True

    assert wait_for(kill_inside_a_batch, timeout=300), "the engine never ran a batch"
    thread.join(timeout=600)
    assert not thread.is_alive(), "make_pairs hung after the engine died"
    assert "error" not in out, out.get("error")
    assert out["result"].rows == len(expected)
    ids = pq.read_table(out["result"].path, columns=["prompt_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected
    # make_pairs' own engines are a pool (an engine that cannot start fails once): the stage actor that lost its
    # engine started a new one and redid the batch there; the killed actor stays dead.
    dead = next(a for a in actors("Generator") if a["ActorID"] == killed["actor_id"])
    assert dead["State"] == "DEAD" and dead["NumRestarts"] == 0, dead
    engines = [a for a in actors("Generator") if a["ActorClassName"] == "Generator"]
    assert any(a["ActorID"] != killed["actor_id"] and a["StartTime"] > dead["StartTime"] for a in engines), engines


def test_warm_engine_killed_mid_batch_is_replaced_and_the_batch_redone(tiny_model, ray_cluster, tmp_path):
    from spin_ray.data.sources import load_sft
    from spin_ray.stages.generate import EnginePool
    from spin_ray.stages.loop import make_pairs

    cfg = cfg_for(tiny_model, tmp_path / "killed", "data.max_rows=48", "data.max_length=256", "generate.max_tokens=160",
                  "generate.batch_size=24", "generate.num_actors=1", "generate.keep_warm=true")
    kwargs = dict(iteration=0, seed=cfg.seed, max_length=cfg.data.max_length,
                  max_prompt_length=cfg.data.max_prompt_length)
    pool = EnginePool(tiny_model, cfg.generate, **kwargs)
    try:
        first = {a["ActorID"] for a in actors("Generator") if a["State"] == "ALIVE"}
        thread, out = in_thread(lambda: make_pairs(cfg, model=tiny_model, pool=pool))
        killed = {}

        def kill_inside_a_batch():
            pid = next(a["Pid"] for a in actors("Generator") if a["ActorID"] == pool.engines[0]._actor_id.hex())
            before = cpu_seconds(pid)
            time.sleep(0.3)
            if cpu_seconds(pid) - before < 0.1:
                return False
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return True

        assert wait_for(kill_inside_a_batch, timeout=300), "the warm engine never ran a batch"
        thread.join(timeout=600)
        assert not thread.is_alive(), "make_pairs hung after the warm engine died"
        assert "error" not in out, out.get("error")
        ids = pq.read_table(out["result"].path, columns=["prompt_id"]).column(0).to_pylist()
        assert len(ids) == len(set(ids)) and set(ids) == set(load_sft(cfg.data).to_arrow().column("prompt_id")
                                                              .to_pylist())
        # Same answers as an uninterrupted run: each prompt's sample is seeded, whichever engine redid the batch.
        clean = make_pairs(cfg_for(tiny_model, tmp_path / "clean", "data.max_rows=48", "data.max_length=256",
                                   "generate.max_tokens=160", "generate.batch_size=24", "generate.num_actors=1"))
        assert row_hashes(out["result"].path) == row_hashes(clean.path)
        # The pool's own dead engine is replaced at its next use, and the new one takes the next model.
        pool.ready()
        assert pool.engines[0]._actor_id.hex() not in first
        pool.reload(tiny_model, 1)
    finally:
        pool.shutdown()


def spin_ray_run(model, storage, *extra):
    sets = [f"model={model}", f"storage={storage}", *TINY, *extra]
    return [sys.executable, "-m", "spin_ray.cli", "run", *sum((["--set", s] for s in sets), [])]


def kill_when(cmd, predicate):
    """Start the CLI, SIGKILL its whole process group once `predicate()` holds (the driver dies mid-stage)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: predicate() or proc.poll() is not None, timeout=600)
        assert proc.poll() is None, "the run ended before the fault was injected"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def logged(storage, text):
    logs = storage / "logs"
    return logs.exists() and any(text in (logs / f).read_text(errors="replace") for f in os.listdir(logs))


def artifacts(storage):
    """What a run leaves, by prompt id and content hash (pairs rows) and file hash (models)."""
    out = {}
    for t in (0, 1):
        out[f"iter_{t}/pairs"] = row_hashes(storage / f"iter_{t}" / "pairs")
        model = storage / f"iter_{t}" / "model"
        out[f"iter_{t}/model"] = {f: hashlib.sha256((model / f).read_bytes()).hexdigest()
                                  for f in sorted(os.listdir(model)) if f.endswith((".safetensors", ".json"))
                                  and f != records.MARKER}
    for t in (0, 1):  # the reference log-probs, in the trainer's row order, bit for bit
        table = records.read_table(str(storage / f"iter_{t}" / "reference"))
        out[f"iter_{t}/reference"] = hashlib.sha256(repr(table.to_pylist()).encode()).hexdigest()
    return out


def test_driver_killed_inside_generate_and_the_reference_pass_resumes_to_identical_artifacts(
        tiny_model, ray_cluster, tmp_path):
    from spin_ray.stages.loop import run

    # The uninterrupted run: the same config as the CLI's (its embedded default under the same --set), in this
    # driver. The reference pass's micro-batches follow from the pairs' lengths alone, so fp32 results repeat bit for
    # bit, and so does training on them.
    extra = ["data.max_rows=16", "loop.iterations=2", "loop.window=2"]
    run(SpinConfig.load(EMBEDDED, [f"model={tiny_model}", f"storage={tmp_path / 'whole'}", *TINY, *extra]))
    storage = tmp_path / "killed"
    cmd = spin_ray_run(tiny_model, storage, *extra)
    pairs0 = storage / "iter_0" / "pairs"

    # Kill 1: inside iteration 0's generation (its engine is up and answering).
    kill_when(cmd, lambda: logged(storage, "iteration 0: generating answers")
              and any(a["State"] == "ALIVE" for a in actors("Generator")))
    assert not records.is_complete(str(pairs0)) and not pairs0.exists()
    with pytest.raises(ConfigError, match="no finished pairs"):
        records.pairs_files(str(pairs0))

    # Kill 2: inside iteration 1's training, which starts with θ_1's reference pass over both iterations' pairs.
    kill_when(cmd, lambda: logged(storage, "iteration 1: training θ_2")
              and any(a["State"] == "ALIVE" for a in actors("RayTrainWorker")))
    assert records.is_complete(str(storage / "iter_0" / "model"))
    assert not records.is_complete(str(storage / "iter_1" / "model"))
    done_pairs0 = {f: os.path.getmtime(pairs0 / f) for f in os.listdir(pairs0)}

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {f: os.path.getmtime(pairs0 / f) for f in done_pairs0} == done_pairs0  # finished stages are kept
    assert artifacts(storage) == artifacts(tmp_path / "whole")
    leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(storage) for n in dirs + files
                 if ".tmp-" in n or n == "ray_train"]
    assert leftovers == []


def test_train_worker_killed_mid_epoch_restarts_from_the_checkpoint_and_uses_each_pair_epochs_times(
        tiny_model, ray_cluster, tmp_path):
    from spin_ray.stages.loop import make_pairs
    from spin_ray.stages.train import train

    # 16 pairs, 4 per step: 4 steps per epoch, 16 in all, a checkpoint every 3.
    cfg = cfg_for(tiny_model, tmp_path, "data.max_rows=16", "train.global_batch_size=4", "train.epochs=4",
                  "train.checkpoint_every=3", "train.max_failures=1")
    make_pairs(cfg)
    metrics = tmp_path / "iter_0" / "train_metrics.jsonl"
    workers_before = {a["ActorID"] for a in actors("RayTrainWorker")}
    thread, out = in_thread(train, cfg)
    killed = {}

    def kill_a_worker_mid_epoch():
        steps = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        alive = [a for a in actors("RayTrainWorker") if a["State"] == "ALIVE" and a["ActorID"] not in workers_before]
        if steps < 6 or not alive:  # inside epoch 1 (steps 5-8) or later, past a checkpoint
            return False
        killed.update(before=metrics.read_text().splitlines(), id=alive[0]["ActorID"])
        os.kill(alive[0]["Pid"], signal.SIGKILL)
        return True

    assert wait_for(kill_a_worker_mid_epoch, timeout=300), "training ended before a worker could be killed"
    thread.join(timeout=600)
    assert not thread.is_alive(), "training hung after its worker died"
    assert "error" not in out, out.get("error")
    assert len(killed["before"]) < 16, "the worker was killed after the last step"
    # The group was restarted: new workers after the killed one.
    assert {a["ActorID"] for a in actors("RayTrainWorker")} - workers_before - {killed["id"]}
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 17))
    saved = (len(killed["before"]) - 1) // 3 * 3  # resumed from a checkpoint: the steps before it are kept as written
    assert metrics.read_text().splitlines()[:saved] == killed["before"][:saved]
    uses = {}
    for m in lines:
        for i in m["pairs"]:
            uses[i] = uses.get(i, 0) + 1
    assert uses == {i: 4 for i in range(16)}  # every pair exactly `epochs` times, restart or not
    assert out["result"].metrics["pairs_not_used_epochs_times"] == 0
    assert records.is_complete(out["result"].model)


def test_disk_full_while_training_is_a_clear_error_and_the_rerun_completes(tiny_model, ray_cluster, tmp_path):
    # Storage on a real filesystem that fills up: room for the logs and the pairs, not for θ_1's checkpoint.
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode()}")
    try:
        cmd = spin_ray_run(tiny_model, disk, "data.max_rows=16", "loop.iterations=1")
        full = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert full.returncode == 1  # not the 120 of a Python that cannot flush its log file at exit
        assert "No space left on device" in full.stderr and "rerun the same command" in full.stderr, full.stderr
        assert "Traceback" not in full.stderr, full.stderr
        pairs = disk / "iter_0" / "pairs"
        assert records.is_complete(str(pairs)) and not records.is_complete(str(disk / "iter_0" / "model"))
        kept = {f: os.path.getmtime(pairs / f) for f in os.listdir(pairs)}

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert {f: os.path.getmtime(pairs / f) for f in os.listdir(pairs)} == kept  # the finished stage untouched
        assert records.is_complete(str(disk / "iter_0" / "model"))
        assert [n for d, dirs, files in os.walk(disk) for n in dirs + files if ".tmp-" in n or n == "ray_train"] == []
    finally:
        subprocess.run(["umount", "-l", str(disk)])


MULTI_NODE = """
import os, sys, threading, time
import pyarrow.parquet as pq
import ray
from ray._private import state
from ray.cluster_utils import Cluster
from spin_ray.config import SpinConfig
from spin_ray.data.sources import load_sft
from spin_ray.stages.loop import make_pairs

model, storage = sys.argv[1:3]
# The head runs no engine (0 CPUs): every engine is on a worker node, so the first one loaded decides the victim.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = {n.node_id: n for n in (cluster.add_node(num_cpus=2) for _ in range(2))}
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()
cfg = SpinConfig.load(None, [f"model={model}", f"storage={storage}", "storage_shared=true", "data.max_rows=48",
                             "data.max_length=256", "data.max_prompt_length=64", "generate.max_tokens=96",
                             "generate.batch_size=8", "generate.num_actors=2", "generate.num_cpus_per_actor=1",
                             "eval.enabled=false"])
expected = set(load_sft(cfg.data).to_arrow().column("prompt_id").to_pylist())
out = {}
thread = threading.Thread(target=lambda: out.update(result=make_pairs(cfg)), daemon=True)
thread.start()

def loaded_engine():
    # The engines are up before the stage starts (the pool waits for them); once a stage actor is up, the batches
    # flow, so the first engine takes the first of the 6 queued batches at once: the stage cannot end before it has
    # been seen here (whatever the machine's load), and it is busy when its node goes.
    actors = list(state.actors().values())
    if not any("PooledGenerator" in a["ActorClassName"] and a["State"] == "ALIVE" for a in actors):
        return None
    return next((a for a in actors if a["ActorClassName"] == "Generator" and a["State"] == "ALIVE"), None)

deadline = time.time() + 300
while time.time() < deadline and not (found := loaded_engine()):
    time.sleep(0.02)
assert found, ("no generation engine came up", state.actors())
engine, victim = found["ActorID"], workers[found["Address"]["NodeID"]]
assert thread.is_alive(), "the stage ended before the node was removed"
cluster.remove_node(victim)
thread.join(timeout=600)
assert not thread.is_alive(), "make_pairs hung after the node was removed"
ids = pq.read_table(out["result"].path, columns=["prompt_id"]).column(0).to_pylist()
assert len(ids) == len(set(ids)) and set(ids) == expected, (len(ids), len(set(ids)), len(expected))
# The engine on the removed node is gone for good; its batch was redone on the other node's engine, and no new
# engine took the CPU the stage's reads and writes needed there.
assert state.actors()[engine]["State"] == "DEAD", state.actors()[engine]
engines = [a for a in state.actors().values() if a["ActorClassName"] == "Generator"]
assert len(engines) == 2, engines
print("OK", len(ids))
ray.shutdown()
cluster.shutdown()
"""


def test_multi_node_generation_survives_a_node_removed_mid_stage(tiny_model, tmp_path):
    # Its own 3-node cluster (head + 2 workers) in a subprocess: this session is connected to another cluster.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", MULTI_NODE, tiny_model, str(tmp_path)], capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0 and "OK 48" in out.stdout, out.stderr[-3000:]
