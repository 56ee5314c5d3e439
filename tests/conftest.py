"""Session fixtures: one tiny offline model and one real local Ray cluster for the whole run (no mocks)."""

import os

import pytest

# Ray Train V2's report() waits for the controller's poll; vLLM runs in-process inside Ray actors.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from spin_ray.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # 4 logical CPUs on 2 cores: Train workers and actor pools mostly wait on each other, so they can share.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    # Subprocesses (the CLI) join this cluster, not whichever cluster started last on the machine.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()
