"""cluster.yaml passes the checks `ray up` runs before it touches AWS, and describes a cluster that can run spin_ray.

`ray up` (ray.autoscaler._private.commands._bootstrap_config) first calls `prepare_config` (merge with the provider's
defaults.yaml, fill per-type min/max workers) and then `validate_config`, which checks the result against Ray's own
JSON schema (ray/autoscaler/ray-schema.json, via jsonschema) plus a few cross-field rules. The same two calls run
here, offline: nothing below contacts AWS.
"""

import copy
import json
import os
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"

# GPUs per instance for the EC2 types this file may reasonably use.
KNOWN_GPU_INSTANCES = {
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8,
    "g6e.xlarge": 1, "g6e.2xlarge": 1, "g6e.4xlarge": 1, "g6e.12xlarge": 4, "g6e.48xlarge": 8,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8, "g6.xlarge": 1, "g6.12xlarge": 4,
}
# Accelerator families (NVIDIA p*/g*, Inferentia, Trainium): never for the head.
ACCELERATOR_FAMILY = re.compile(r"^(p\d|g\d|inf\d|trn\d|dl\d)")


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does to the config before any cloud call; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def raw() -> dict:
    return load()


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return ray_validate(raw)


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def gpus(node_type: dict) -> int:
    declared = node_type.get("resources", {}).get("GPU")
    if declared is not None:
        return declared
    # `resources: {}` means "auto-detect from the instance type" on AWS.
    return KNOWN_GPU_INSTANCES.get(node_type["node_config"].get("InstanceType"), 0)


def ray_schema() -> dict:
    # The path validate_config reads.
    return json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())


def test_schema_file_is_a_valid_schema():
    schema = ray_schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema["additionalProperties"] is False  # unknown top-level keys are errors, not ignored


def test_validates_against_rays_cluster_schema(prepared, raw):
    assert prepared["cluster_name"] == "spin-ray"
    # The raw file itself is schema-valid too (no unknown keys that only the merge could hide).
    jsonschema.validate(raw, ray_schema())


def test_provider_auth_and_scaling(raw):
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"] == "us-west-2"
    assert isinstance(raw["provider"]["cache_stopped_nodes"], bool)
    assert raw["auth"]["ssh_user"] == "ubuntu"
    assert raw["idle_timeout_minutes"] > 0
    assert raw["max_workers"] >= 1


def test_gpu_worker_type_autoscales_from_zero(prepared):
    gpu_types = {k: v for k, v in worker_types(prepared).items() if gpus(v) >= 1}
    assert gpu_types, "no worker node type provides GPUs"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= prepared["max_workers"], name
        instance = node_type["node_config"]["InstanceType"]
        if instance in KNOWN_GPU_INSTANCES and "GPU" in node_type["resources"]:
            assert node_type["resources"]["GPU"] == KNOWN_GPU_INSTANCES[instance], (name, instance)
    # At least one type can host a whole 8-GPU data-parallel train group (the paper's 8x A100 recipe).
    assert max(gpus(t) for t in gpu_types.values()) >= 8


def test_head_has_no_gpus(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not ACCELERATOR_FAMILY.match(head["node_config"]["InstanceType"])
    assert head["max_workers"] == 0


def test_every_node_links_spin_ray_without_installing_torch_or_vllm(prepared):
    mounts = prepared["file_mounts"]
    repo_remote = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert repo_remote, "file_mounts should copy the checkout ('.') to the nodes"
    remote = repo_remote[0]

    def links(cmd: str) -> bool:
        return "pip install" in cmd and remote in cmd and "--no-deps" in cmd and "-e ." in cmd

    # prepare_config merges setup_commands into both lists, as `ray up` does: both node roles must link the checkout,
    # and no node installs the heavy dependencies at boot (they are in the image).
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[key]
        assert any(links(c) for c in cmds), (key, cmds)
        for c in cmds:
            if "pip install" in c:
                assert not re.search(r"torch|vllm|\[gpu|install\.sh", c), c
    for name, node_type in worker_types(prepared).items():  # a per-type override would replace the global list
        if "worker_setup_commands" in node_type:
            assert any(links(c) for c in node_type["worker_setup_commands"]), name
    assert ".venv" in prepared["rsync_exclude"]


def test_image_matches_the_project_pins(raw):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(Requirement(r) for r in deps["dependencies"] if Requirement(r).name == "ray")
    vllm_pin = next(Requirement(r) for r in deps["optional-dependencies"]["gpu"] if Requirement(r).name == "vllm")
    docker = raw.get("docker", {})
    images = {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    assert images
    for image in images:
        # The tag names what is baked in: ray<version>-vllm<version>.
        m = re.search(r":ray(\d+\.\d+\.\d+)-vllm(\d+\.\d+\.\d+)$", image)
        assert m, image
        assert ray_pin.specifier.contains(m.group(1)) and m.group(1) == ray.__version__, (image, ray.__version__)
        assert vllm_pin.specifier.contains(m.group(2)), (image, str(vllm_pin))
    # The recipe in the header builds it from Ray's image of the same version.
    base = re.search(r"FROM rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", CLUSTER_YAML.read_text())
    assert base and base.group(1) == ray.__version__


def test_start_commands_use_token_auth_and_keep_the_dashboard_local(raw):
    head = " ".join(raw["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "0.0.0.0" not in head and "--dashboard-host=127.0.0.1" in head
    workers = " ".join(raw["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in workers
    for cmds in (head, workers):
        assert "RAY_AUTH_MODE=token" in cmds


def test_h100_and_a100_worker_types(prepared):
    types = {t["node_config"]["InstanceType"]: t for t in worker_types(prepared).values()}
    assert {"p4de.24xlarge", "p5.48xlarge"} <= set(types)
    assert types["p5.48xlarge"]["resources"] == {"CPU": 192, "GPU": 8}
    assert types["p4de.24xlarge"]["resources"] == {"CPU": 96, "GPU": 8}


# EFA network cards per instance type (AWS: p4de 4, p5 32).
EFA_CARDS = {"p4de.24xlarge": 4, "p5.48xlarge": 32}


def test_gpu_nodes_have_efa_in_one_subnet_and_a_placement_group(raw):
    subnets = set()
    for name, node_type in worker_types(raw).items():
        cfg = node_type["node_config"]
        interfaces = cfg["NetworkInterfaces"]
        assert len(interfaces) == EFA_CARDS[cfg["InstanceType"]], name
        assert all(i["InterfaceType"] == "efa" for i in interfaces), name
        assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(len(interfaces))), name
        assert [i["DeviceIndex"] for i in interfaces if i["NetworkCardIndex"] == 0] == [0], name
        assert cfg["Placement"]["GroupName"], name
        # `ray up`'s rule (aws/config.py, _configure_subnets_and_groups_from_network_interfaces; it needs boto3):
        # with NetworkInterfaces, subnets and security groups are given only in each interface.
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(cfg), name
        assert all(i.get("SubnetId") and i.get("Groups") for i in interfaces), name
        subnets |= {i["SubnetId"] for i in interfaces}
    head = raw["available_node_types"][raw["head_node_type"]]["node_config"]
    assert subnets == set(head["SubnetIds"]) and len(subnets) == 1  # one subnet: one availability zone
    assert raw["provider"]["availability_zone"].count(",") == 0
    run_options = " ".join(raw["docker"]["run_options"])
    assert "FI_PROVIDER=efa" in run_options and "/dev/infiniband" in run_options and "memlock=-1" in run_options


def test_caches_on_the_instance_nvme(raw):
    run_options = " ".join(raw["docker"]["run_options"])
    assert "-v /opt/dlami/nvme:/mnt/nvme" in run_options
    for var in ("HF_HOME", "SPIN_RAY_CACHE", "VLLM_CACHE_ROOT"):
        assert f"--env {var}=/mnt/nvme/" in run_options, var
    assert "--temp-dir=/mnt/nvme/ray" in " ".join(raw["head_start_ray_commands"])  # object spilling too


def test_every_placeholder_says_fill_in():
    lines = CLUSTER_YAML.read_text().splitlines()
    for i, line in enumerate(lines):
        value = line.split("#", 1)[0]
        if "REPLACE_ME" in value or "<ACCOUNT_ID>" in value:
            near = " ".join(lines[max(0, i - 3): i + 1])
            assert "FILL IN" in near, (i + 1, line)


def test_shared_storage_and_iam(raw):
    text = CLUSTER_YAML.read_text()
    assert "--set storage=s3://" in text and "ray up cluster.yaml" in text and "ray down cluster.yaml" in text
    for name, node_type in raw["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], name


def _set(config: dict, path: str, value) -> dict:
    broken = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = broken
    for key in parents:
        node = node[key]
    node[leaf] = value
    return broken


@pytest.mark.parametrize("path, value, error, match", [
    # unknown top-level key
    ("spin_ray", {"storage": "s3://b/spin"}, jsonschema.ValidationError, "'spin_ray' was unexpected"),
    # wrong types
    ("max_workers", "four", jsonschema.ValidationError, "is not of type 'integer'"),
    ("idle_timeout_minutes", "15", jsonschema.ValidationError, "is not of type 'number'"),
    ("provider.cache_stopped_nodes", "yes", jsonschema.ValidationError, "is not of type 'boolean'"),
    ("available_node_types.gpu_worker.resources", {"GPU": 0.5}, jsonschema.ValidationError, "not of type 'integer'"),
    # unknown keys further down
    ("available_node_types.gpu_worker.min_worker", 0, jsonschema.ValidationError, "'min_worker' was unexpected"),
    ("docker.gpus", "all", jsonschema.ValidationError, "'gpus' was unexpected"),
    # validate_config's cross-field rules
    ("head_node_type", "no_such_type", ValueError, "must be one of `available_node_types`"),
    ("available_node_types.gpu_worker.min_workers", 99, ValueError, "smaller than the sum of `min_workers`"),
])
def test_validation_rejects_a_broken_copy(raw, path, value, error, match):
    ray_validate(raw)  # the original is fine ...
    with pytest.raises(error, match=re.escape(match)):  # ... the copy with one bad field is not
        ray_validate(_set(raw, path, value))


def test_validation_rejects_a_missing_required_field(raw):
    broken = copy.deepcopy(raw)
    del broken["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="'node_config' is a required property"):
        ray_validate(broken)
