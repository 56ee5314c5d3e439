"""Multi-node behaviour on a real multi-node Ray cluster (ray.cluster_utils.Cluster), in a subprocess of its own
because the test session is already connected to another cluster."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import ray
from ray.cluster_utils import Cluster
from spin_ray.config import ConfigError, SpinConfig
from spin_ray.stages.loop import check_storage

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
cluster.wait_for_nodes()
try:
    check_storage(SpinConfig.load(None, ["storage=/tmp/node-local"]))
    raise SystemExit("node-local storage was accepted on 2 nodes")
except ConfigError as e:
    assert "node-local path" in str(e) and "2 nodes" in str(e) and "s3://" in str(e), e
check_storage(SpinConfig.load(None, ["storage=s3://bucket/spin"]))
check_storage(SpinConfig.load(None, ["storage=/mnt/shared/spin", "storage_shared=true"]))

# No autoscaler here: the capacity preflight checks is what the two nodes have (1 + 1 CPU, no GPU).
from spin_ray.stages.resources import cluster_capacity, preflight, requests
assert cluster_capacity()["CPU"] == 2 and cluster_capacity().get("GPU", 0) == 0, cluster_capacity()
small = ["model=tiny", "data.max_length=64", "data.max_prompt_length=32", "generate.max_tokens=16"]
assert requests(preflight(SpinConfig.load(None, small)))["generate"].gpus == 0  # auto without GPUs: CPU
try:  # the phases take turns: generation alone needs more than the cluster has
    preflight(SpinConfig.load(None, small + ["generate.num_actors=3"]))
    raise SystemExit("3 CPUs of generation actors were accepted on 2")
except ConfigError as e:
    assert "generate.num_actors = 3 needs 3 CPU" in str(e) and "at most 2" in str(e), e
# 2 CPUs in all, but one node has 1: a Train worker of 2 CPUs would wait forever
try:
    preflight(SpinConfig.load(None, small + ["train.num_cpus_per_worker=2"]), stages=("train",))
    raise SystemExit("a 2-CPU Train worker was accepted on two 1-CPU nodes")
except ConfigError as e:
    assert "needs 2 CPU (train.num_cpus_per_worker) on one node" in str(e) and "largest: 0 GPU, 1 CPU" in str(e), e
ray.shutdown()
cluster.shutdown()
print("OK")
"""


def test_multi_node_refuses_node_local_storage():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
