"""Session fixtures: one tiny offline model and one real local Ray cluster for the whole run (no mocks); heads
started with the real `ray start` for the tests of long-lived clusters."""

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

# Ray Train V2's report() waits for the controller's poll (spin_ray sets 0.5 s for its own fits; shorter here).
# Nothing else of spin_ray's is set here: the engines and workers declare the environment they need (generate.
# engine_env), so the tests start them as a library caller's plain ray.init() would.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from spin_ray.models.builders import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # 4 logical CPUs on 2 cores: Train workers and actor pools mostly wait on each other, so they can share.
    # The dashboard process serves the state API, which Ray Train's placement-group cleaner polls (loopback only).
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    # Subprocesses (the CLI) join this cluster, not whichever cluster started last on the machine.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A cluster started like a user's long-lived one (`ray start --head`, dashboard on loopback), on free ports, with
    its own RAY_TMPDIR: Ray's address file lands there, so a command run with `env` finds the cluster as it would
    find a user's. `stop()` kills only this cluster's processes (`ray stop` would stop every cluster here)."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_TMPDIR=self.tmp, PATH=f"{Path(sys.executable).parent}:{self.env['PATH']}",
                        RAY_AUTH_MODE="token")  # as `ray start` does when a token exists (~/.ray/auth_token)
        self.address = self.dashboard = ""
        self.port = 0

    def start(self, num_gpus: int = 0) -> None:
        """`num_gpus`: logical GPUs (Ray schedules on them; nothing here has CUDA)."""
        port, dashboard = free_port(), free_port()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                        f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                        "--include-dashboard=true",
                        # Every port its own: another cluster on this machine (the test session's) holds the defaults.
                        *(f"--{name}={free_port()}" for name in [
                            "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                            "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                            "object-manager-port"]),
                        "--num-cpus=4", f"--num-gpus={num_gpus}", "--disable-usage-stats"], env=self.env, check=True, capture_output=True,
                       timeout=120)
        self.port, self.address, self.dashboard = port, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"

    def stop(self) -> None:
        procs = [p for p in psutil.process_iter(["cmdline"]) if any(self.tmp in a for a in p.info["cmdline"] or [])]
        for p in procs:
            p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=3)  # then killed: a cluster that goes away need not go quietly
        for p in alive:
            p.kill()
        time.sleep(1)


@pytest.fixture
def ray_head():
    head = RayHead()
    yield head
    head.stop()
    shutil.rmtree(head.tmp, ignore_errors=True)


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `folder`, read from the TFRecord framing and the Event protos."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4  # length, its CRC, the record, its CRC
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def wandb_records(folder: Path) -> list[tuple[str, object]]:
    """(file, Record) of every W&B run file (`run-<id>.wandb`) under `folder`, in file order: W&B's log framing
    (a 7-byte `:W&B` header, then 32 KiB blocks of records, each with a 7-byte header: CRC, length, type
    full/first/middle/last) around its Record protos. Read after W&B's service has stopped, as at a process's exit:
    `run.finish()` only informs the service, which closes the file a moment later."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()

    out = []
    for path in sorted(folder.rglob("run-*.wandb")):
        data, at, chunk = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        while at + 7 <= len(data):
            if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
                at += 32768 - at % 32768
                continue
            length, kind = struct.unpack("<HB", data[at + 4:at + 7])
            chunk += data[at + 7:at + 7 + length]
            at += 7 + length
            if kind in (1, 4):  # full, or the last piece of a split record
                out.append((path.name, wandb_internal_pb2.Record.FromString(chunk)))
                chunk = b""
    return out
