"""benchmarks/gpu.py runs end to end on CPU (gloo, the tiny architecture): the script that is run only where a GPU is
lent must not first break there. Its figures are not checked here, only that every section is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.integration  # a subprocess of a whole benchmark: not the fast tier


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"),
                    "--arch", os.path.join(ROOT, "spin_ray", "assets", "arch", "tiny-llama.json"), "--steps", "2",
                    "--repeats", "1", "--pairs-per-step", "4", "--micro-batch", "2", "--max-length", "128", "--max-prompt-length", "64",
                    "--no-sdpa-probe", "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    out = json.load(open(tmp_path / "gpu.json"))
    assert set(out["summary"]) == {"before", "packed", "varlen", "budget"}
    assert abs(out["ln2_check"]["minus_ln2"]) < 1e-4  # bf16 on CPU: the reference is the step's own forward
    assert out["reference"]["pairs"] == 8 and out["reference"]["tok_s"] > 0
    assert out["plan"]["train_memory_total_gb"] > 0
