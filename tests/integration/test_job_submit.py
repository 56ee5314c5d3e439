"""`ray job submit` from a "laptop" to a head started on loopback, running jobs/spin.py (the real CLI path)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from spin_ray import records

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head():
    """A second Ray cluster, started like a real head node; stopped by killing only its own processes."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    # Ray 2.60 protects the dashboard with a token (~/.ray/auth_token); clients opt in with RAY_AUTH_MODE=token.
    env["RAY_AUTH_MODE"] = "token"
    dashboard = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                    # Every port its own: another cluster on this machine (the test session's) holds the defaults.
                    *(f"--{name}={free_port()}" for name in ["ray-client-server-port", "dashboard-agent-listen-port",
                                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                                             "runtime-env-agent-port", "node-manager-port",
                                                             "object-manager-port"]),
                    "--num-cpus=4", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{dashboard}", env
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in p.info["cmdline"] or []):
            p.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_loop(head, tiny_model, tmp_path, monkeypatch):
    address, env = head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the session cluster's, which the job client would follow
    sets = [f"model={tiny_model}", f"storage={tmp_path}", "loop.iterations=1", "data.max_rows=8",
            "data.max_length=128", "data.max_prompt_length=64", "generate.max_tokens=8",
            "generate.num_cpus_per_actor=0.5", "score.num_cpus_per_actor=0.5", "train.global_batch_size=8",
            "train.micro_batch_size=4", "eval.rows=8"]
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "job", "submit", "--address", address, "--working-dir", str(REPO), "--no-wait",
           "--runtime-env-json", json.dumps({"excludes": [".git", ".venv", "runs", "benchmarks/results"]}),
           "--", "python", "jobs/spin.py", *sum((["--set", s] for s in sets), [])]
    for _ in range(30):  # a fresh head's job agent takes a few seconds to register
        submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(1)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + 600
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in 10 minutes"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    assert records.is_complete(str(tmp_path / "iter_0" / "pairs"))
    assert records.is_complete(str(tmp_path / "iter_0" / "model"))
    assert "iter  pairs" in logs and str(tmp_path / "iter_0" / "model") in logs
