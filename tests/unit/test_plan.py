"""spin_ray.stages.resources: what each stage asks for and the pre-flight refusals (`spin-ray plan`'s sizing: test_sizing.py).

No Ray: every check takes the cluster's resources as a dict. Expected numbers are derived by hand in the comments.
"""

import dataclasses

import pytest

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.stages.resources import auto_shard_size, auto_workers, phases, preflight, requests, resolve
from spin_ray.tools.plan import make_plan, parse_cluster
from spin_ray.training.memory import load_arch

CPU4 = {"CPU": 4.0}


def cfg(*overrides: str) -> SpinConfig:
    return SpinConfig.load(None, ["model=tiny", "data.max_length=64", "data.max_prompt_length=32",
                                  "generate.max_tokens=16", *overrides])


def test_resources_decide_the_gpu_requests():
    gpu_cluster = {"CPU": 32.0, "GPU": 8.0}
    r = requests(resolve(cfg("generate.tensor_parallel_size=2"), gpu_cluster))  # auto on a GPU cluster
    assert (r["generate"].gpus, r["train"].gpus) == (2.0, 1.0)
    r = requests(resolve(cfg(), CPU4))  # auto, no GPUs anywhere
    assert (r["generate"].gpus, r["train"].gpus) == (0.0, 0.0)
    # gpu: asked for even while the cluster has none (an autoscaler adds GPU nodes for the demand)
    r = requests(resolve(cfg("resources=gpu"), CPU4))
    assert (r["generate"].gpus, r["train"].gpus) == (1.0, 1.0)
    r = requests(resolve(cfg("resources=cpu", "generate.num_gpus_per_actor=0.5"), gpu_cluster))
    assert (r["generate"].gpus, r["train"].gpus) == (0.5, 0.0)  # explicit values win
    with pytest.raises(ConfigError, match="resources"):
        cfg("resources=cpu", "train.use_gpu=true")


def test_auto_engines_take_every_gpu_in_tensor_parallel_groups():
    # 8 GPUs / tp 2 = 4 engines of 2 GPUs; 8 / tp 3 = 2 engines (6 GPUs, the rest cannot hold one); CPU: 1 engine.
    gpu_cluster = {"CPU": 32.0, "GPU": 8.0}
    for tp, engines in ((1, 8), (2, 4), (3, 2)):
        g = resolve(cfg("generate.num_actors=auto", f"generate.tensor_parallel_size={tp}"), gpu_cluster).generate
        assert (g.num_actors, g.num_gpus_per_actor) == (engines, float(tp))
    assert resolve(cfg("generate.num_actors=auto"), CPU4).generate.num_actors == 1
    assert resolve(cfg("generate.num_actors=3"), gpu_cluster).generate.num_actors == 3  # an int is kept
    with pytest.raises(ConfigError, match="generate.num_actors = 0: must be >= 1 or auto"):
        cfg("generate.num_actors=0")


def test_preflight_refuses_max_tokens_that_leave_no_prompt():
    with pytest.raises(ConfigError, match=r"generate.max_tokens = 64 .*data.max_length = 64"):
        preflight(cfg("generate.max_tokens=64"), CPU4)
    preflight(cfg("generate.max_tokens=63"), CPU4)


def test_preflight_refuses_pools_that_only_fit_one_at_a_time():
    # Warm engines keep their GPUs while training runs
    c = cfg("resources=gpu", "generate.num_actors=2", "generate.keep_warm=true", "train.num_workers=2",
            "train.global_batch_size=16")
    with pytest.raises(ConfigError) as e:
        preflight(c, {"CPU": 16.0, "GPU": 3.0})
    msg = str(e.value)
    assert "generate.num_actors = 2" in msg and "train.num_workers = 2" in msg and "4 GPU together" in msg
    assert "while training runs" in msg and "at most 3" in msg
    preflight(c, {"CPU": 16.0, "GPU": 4.0})
    # Without warm engines the phases take turns on the same 2 GPUs
    preflight(cfg("resources=gpu", "generate.num_actors=2", "train.num_workers=2", "train.global_batch_size=16"),
              {"CPU": 16.0, "GPU": 2.0})
    # CPUs count the same way: 3 warm engines of 1 CPU + a worker of 2 on 4 CPUs
    with pytest.raises(ConfigError, match="CPU together"):
        preflight(cfg("generate.num_actors=3", "generate.keep_warm=true", "train.num_cpus_per_worker=2"), CPU4)


def test_preflight_refuses_a_unit_that_fits_no_single_node():
    # Three 4-GPU nodes have 12 GPUs in all, but a tensor-parallel-8 engine needs 8 on one node; Ray would wait forever.
    c = cfg("resources=gpu", "generate.tensor_parallel_size=8", "train.num_workers=1",
            "train.global_batch_size=8")
    nodes = [{"CPU": 48.0, "GPU": 4.0}] * 3
    preflight(c, {"CPU": 144.0, "GPU": 12.0}, stages=("pairs",))  # totals alone let it through
    with pytest.raises(ConfigError) as e:
        preflight(c, {"CPU": 144.0, "GPU": 12.0}, stages=("pairs",), nodes=nodes)
    msg = str(e.value)
    assert "generation actors (generate.num_actors) needs 8 GPU" in msg and "tensor_parallel_size" in msg
    assert "largest: 4 GPU, 48 CPU" in msg
    preflight(c, {"CPU": 144.0, "GPU": 12.0}, stages=("pairs",), nodes=[{"CPU": 96.0, "GPU": 8.0}, nodes[0]])
    # CPUs per Train worker likewise, and `spin-ray plan` checks its stated node size the same way
    with pytest.raises(ConfigError, match=r"Train workers .*needs 12 CPU \(train.num_cpus_per_worker\)"):
        preflight(cfg("train.num_cpus_per_worker=12"), {"CPU": 16.0}, nodes=[{"CPU": 8.0}] * 2)
    plan = make_plan(cfg("resources=gpu", "generate.tensor_parallel_size=8", "train.num_workers=1",
                         "train.global_batch_size=8"), parse_cluster("3x4xH100"), load_arch("tiny"), prompts=64)
    assert any("needs 8 GPU" in p for p in plan.problems)


def test_preflight_refuses_warm_engines_holding_what_training_needs():
    c = cfg("resources=gpu", "generate.keep_warm=true", "train.num_workers=2", "train.global_batch_size=16")
    assert phases(resolve(c, {"GPU": 2.0}))["train"] == ["train", "generate"]
    with pytest.raises(ConfigError, match=r"generate.keep_warm = true.*training runs.*at most 2"):
        preflight(c, {"CPU": 16.0, "GPU": 2.0})
    preflight(dataclasses.replace(c, generate=dataclasses.replace(c.generate, keep_warm=False)),
              {"CPU": 16.0, "GPU": 2.0})


def test_preflight_refuses_a_global_batch_the_workers_cannot_divide():
    c = cfg()
    broken = dataclasses.replace(c, train=dataclasses.replace(c.train, num_workers=3, micro_batch_size=8,
                                                              global_batch_size=64))  # built in code: no load()
    with pytest.raises(ConfigError, match=r"train.global_batch_size .*multiple of train.num_workers \(3\)"):
        preflight(broken, {"CPU": 16.0})
    # micro_batch_size caps a forward's pairs; it need not divide a worker's share (64 / 2 = 32 pairs, 3 forwards).
    preflight(dataclasses.replace(c, train=dataclasses.replace(c.train, num_workers=2, micro_batch_size=12,
                                                               global_batch_size=64)), {"CPU": 16.0})


def test_a_train_command_does_not_count_warm_engines_it_never_starts():
    c = cfg("generate.keep_warm=true", "train.num_workers=2", "train.global_batch_size=16",
            "generate.num_cpus_per_actor=2", "train.num_cpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"generate.keep_warm = true.*training runs"):
        preflight(c, {"CPU": 3.0}, stages=("train",))  # the loop: engines stay up while training runs
    preflight(c, {"CPU": 3.0}, stages=("train",), warm_engines=False)  # `spin-ray train`: no engine


def test_preflight_checks_only_the_phases_asked_for():
    c = cfg("train.num_workers=8", "train.global_batch_size=64")
    preflight(c, CPU4, stages=("pairs",))  # `spin-ray generate` does not need the Train workers
    with pytest.raises(ConfigError, match="train.num_workers = 8"):
        preflight(c, CPU4, stages=("train",))


def test_num_workers_auto_uses_every_gpu_the_global_batch_can_feed():
    assert auto_workers(64, 8) == 8 and auto_workers(64, 32) == 32  # 32 GPUs: 2 pairs per GPU per step
    assert auto_workers(64, 6) == 4 and auto_workers(6, 8) == 6  # the largest count that divides the batch
    assert auto_workers(64, 0) == 1  # CPU cluster: one worker
    c = cfg("train.num_workers=auto", "train.strategy=fsdp", "train.hsdp_shard_size=auto", "train.micro_batch_size=1",
            "train.global_batch_size=64")
    node = {"CPU": 96.0, "GPU": 8.0}
    one = preflight(c, node, nodes=[node])
    assert (one.train.num_workers, one.train.hsdp_shard_size, one.train.use_gpu) == (8, None, True)
    four = preflight(c, {"CPU": 4 * 96.0, "GPU": 32.0}, nodes=[node] * 4)
    assert (four.train.num_workers, four.train.hsdp_shard_size) == (32, 8)  # HSDP: shard within a node
    assert requests(four)["train"].total() == {"CPU": 32.0, "GPU": 32.0}
    assert preflight(c, CPU4).train.num_workers == 1
    assert auto_shard_size("ddp", 32, 8) is None and auto_shard_size("fsdp", 32, 0) is None  # node sizes unknown
    # an explicit shard size is checked against the resolved count: 64 pairs on 6 GPUs → 4 workers
    with pytest.raises(ConfigError, match=r"train.hsdp_shard_size = 3: .*divisor of train.num_workers \(4\)"):
        preflight(cfg("train.num_workers=auto", "train.strategy=fsdp", "train.hsdp_shard_size=3",
                      "train.global_batch_size=64"), {"CPU": 12.0, "GPU": 6.0})
    for bad in ["autp", "2.5", "0"]:
        with pytest.raises(ConfigError, match=f"train.num_workers = .*{bad}.*(int or 'auto'|>= 1 or auto)"):
            cfg(f"train.num_workers={bad}")


def test_num_workers_auto_on_an_autoscaler_that_reports_no_gpu_count(monkeypatch):
    import ray

    c = cfg("train.num_workers=auto", "resources=gpu", "train.global_batch_size=64")
    unbounded = {"CPU": float("inf"), "GPU": float("inf")}  # the cluster launcher's autoscaler (cluster_capacity)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})  # no GPU node up yet
    with pytest.raises(ConfigError, match=r"train.num_workers = 'auto': no GPU node is up .*set train.num_workers"):
        preflight(c, unbounded, stages=("train",))
    preflight(c, unbounded, stages=("pairs",))  # generation does not need the count
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 200.0, "GPU": 16.0})  # two 8-GPU nodes up
    assert preflight(c, unbounded).train.num_workers == 16
