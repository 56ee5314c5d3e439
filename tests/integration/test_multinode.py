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
from spin_ray.loop import check_storage

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
ray.shutdown()
cluster.shutdown()
print("OK")
"""


def test_multi_node_refuses_node_local_storage():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
