"""Autoscaling from zero GPU nodes on Ray's fake multi-node provider, and the pre-flight refusal
through the real CLI.

The cluster is the one `ray.cluster_utils.AutoscalingCluster` builds (a head with no GPUs, a worker type with logical
GPUs, min 0 / max 2, `provider.type: fake_multinode`, RAY_FAKE_CLUSTER=1), started here by hand because
AutoscalingCluster.start/shutdown run `ray stop --force`, which would kill every Ray on this shared machine (the test
session's cluster included), and its template (fake_multi_node/example.yaml) is not in the Ray wheel. It runs in a
subprocess of its own session on its own port and temp dir; the test kills that process group, and nothing else.

What is real: the GPU request of each actor is spin_ray.stages.resources's (`preflight` → `requests`, from `resources: gpu`),
and the capacity preflight checks is what the autoscaler can reach (`cluster_capacity`); the actors are trivial
(they record the node they landed on and the GPU ids Ray gave them) so that the test stays fast — the same numbers
go to Ray Data's map_batches and EnginePool in generate.py/train.py.
"""

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = r"""
import json, os, socket, subprocess, sys, tempfile, time
import ray
from ray._private import ray_constants
from ray.experimental.internal_kv import _internal_kv_get
from spin_ray.config import SpinConfig
from spin_ray.stages.resources import cluster_capacity, preflight, requests

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
ip = ray.util.get_node_ip_address()
config = {
    "cluster_name": "spin-autoscaling-test", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True, "gcs_address": f"{ip}:{port}"},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "gpu_worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200 * 1024 ** 2},
                       "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "initialization_commands": [],
    "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}
workdir = tempfile.mkdtemp(prefix="spin-as-")
with open(os.path.join(workdir, "cluster.json"), "w") as f:
    json.dump(config, f)
env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
subprocess.check_call([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", f"--port={port}",
                       f"--autoscaling-config={workdir}/cluster.json", "--num-cpus=1", "--num-gpus=0",
                       "--include-dashboard=false", f"--temp-dir={workdir}/ray",
                       "--object-store-memory=200000000"], env=env, stdout=subprocess.DEVNULL)
ray.init(address=f"{ip}:{port}", log_to_driver=False)
head = ray.get_runtime_context().get_node_id()
assert ray.cluster_resources().get("GPU", 0) == 0, ray.cluster_resources()
# The monitor's first status update follows `ray start`; poll for it (a hang guard, not a speed check).
for _ in range(120):
    if b"autoscaler_report" in (_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b""):
        break
    time.sleep(0.5)
else:
    raise AssertionError("the autoscaler never published a status")
# None live; the launcher's autoscaler does not report its node types, so what it can add counts as unbounded.
assert cluster_capacity().get("GPU") == float("inf"), cluster_capacity()

# gpu: the stages ask for GPUs though none is live; cpu: never.
base = ["model=tiny", "data.max_length=64", "data.max_prompt_length=32", "generate.max_tokens=16",
        "generate.num_cpus_per_actor=0.5"]
assert requests(preflight(SpinConfig.load(None, base + ["resources=cpu"])))["generate"].gpus == 0
cfg = preflight(SpinConfig.load(None, base + ["resources=gpu"]), stages=("pairs",))
assert requests(cfg)["generate"].gpus == requests(cfg)["train"].gpus == 1
# auto: GPUs when the config trains on them (an unknown autoscaler capacity alone is no reason to wait for GPUs).
assert requests(preflight(SpinConfig.load(None, base + ["train.use_gpu=true"])))["generate"].gpus == 1
assert requests(preflight(SpinConfig.load(None, base)))["generate"].gpus == 0


@ray.remote
class Stage:
    def where(self):
        return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]


reqs = requests(cfg)
actors = [Stage.options(num_cpus=reqs[s].cpus, num_gpus=reqs[s].gpus).remote() for s in ("generate", "train")]
placed = ray.get([a.where.remote() for a in actors], timeout=240)
nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
for node, gpus in placed:
    assert node != head and nodes[node]["Resources"].get("GPU") == 1, (node, nodes[node]["Resources"])
    assert len(gpus) == 1, gpus
assert len({node for node, _ in placed}) == 2, placed  # one GPU node each: the autoscaler added two
print("PLACED", json.dumps(placed))
ray.shutdown()
print("OK")
"""


def test_gpu_requests_scale_a_cluster_up_from_zero_gpu_nodes():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # `ray start` turns token auth on; the driver and fake nodes must send it
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=420)
    finally:
        try:  # the head's daemons and the fake worker nodes stay in the script's process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0 and "OK" in out, (out[-2000:], err[-4000:])


def test_cli_refuses_before_any_actor_starts(ray_cluster, tmp_path):
    """`spin-ray generate` with an answer as long as the whole sequence: exit 2 naming both fields, nothing written."""
    out = subprocess.run([sys.executable, "-m", "spin_ray.cli", "generate", "--set", "model=tiny",
                          "--set", f"storage={tmp_path}/run", "--set", "generate.max_tokens=256",
                          "--set", "data.max_length=256", "--set", "data.max_prompt_length=128"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "generate.max_tokens = 256" in out.stderr and "data.max_length = 256" in out.stderr
    assert not (tmp_path / "run" / "iter_0").exists()  # nothing but the log (<storage>/logs)
