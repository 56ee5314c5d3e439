"""`ray job submit` from a "laptop" to a head started on loopback, running jobs/spin.py (the real CLI path)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spin_ray.data import records

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_the_loop(ray_head, tiny_model, tmp_path, monkeypatch):
    ray_head.start()
    address, env = ray_head.dashboard, ray_head.env
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the session cluster's, which the job client would follow
    sets = [f"model={tiny_model}", f"storage={tmp_path}", "loop.iterations=1", "data.max_rows=8",
            "data.max_length=128", "data.max_prompt_length=64", "generate.max_tokens=8",
            "generate.num_cpus_per_actor=0.5", "train.global_batch_size=8",
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
    # The run's last screen, in the job's logs: θ_1 kept at its folder.
    assert f"kept (*): θ_1 (loop.select = last) at {tmp_path / 'iter_0' / 'model'}" in logs, logs[-3000:]
