"""benchmarks/paper_claim.py --quick end to end (its own Ray cluster, real vLLM engines, Ray Train): the outputs exist,
hold a row per model with real numbers, and the SFT row is what spin_ray.evaluate measures for that model."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spin_ray.stages.evaluate import evaluate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "paper_claim.py"


def load_script():
    spec = importlib.util.spec_from_file_location("paper_claim", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_table_json_and_plot(tmp_path, ray_cluster):
    out = tmp_path / "claim"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the script starts its own local cluster
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "task_score.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    claim = load_script()
    n_iter = claim.QUICK.iterations
    assert result["seeds"] == [0] and result["sizes"]["iterations"] == n_iter and result["complete"]
    assert result["regimes"] == ["plateau"]  # --quick: regime (b) only, the same code path as (a)

    for regime in result["regimes"]:
        assert claim.REGIME_TITLES[regime] in markdown
        table = result["summary"][regime]["table"]
        expected = (["SFT (θ_0)"] + [f"SPIN iter {t} (θ_{t + 1})" for t in range(n_iter)]
                    + [f"more SFT (steps of SPIN iter ≤ {t})" for t in range(n_iter)])
        assert [e["row"] for e in table] == expected
        for e in table:
            assert f"| {e['row']} |" in markdown
            assert 0.0 <= e["task_score"]["mean"] <= 1.0
            assert math.isfinite(e["nll_per_token"]["mean"]) and e["nll_per_token"]["mean"] > 0
            assert set(e["by_kind"]) == {"add", "count", "reverse", "sort"}
            # Every model after θ_0 is compared with the one before it (the fixed-point signal).
            assert (e["reward_accuracy"] is None) == (e["row"] == "SFT (θ_0)")
            if e["reward_accuracy"] is not None:
                assert 0.0 <= e["reward_accuracy"]["mean"] <= 1.0

        run = result["runs"][regime]["0"]
        # More SFT segment t has SPIN iteration t's optimizer steps: 64 prompts, batch 32, 1 epoch.
        assert [r["steps"] for r in run["spin"][1:]] == [r["steps"] for r in run["more_sft"]] == [2] * n_iter
        # SPIN's iterates are distinct models, each scored on the same held-out prompts.
        assert len({r["model"] for r in run["spin"] + run["more_sft"]}) == 1 + 2 * n_iter
        assert {r["rows"] for r in run["spin"] + run["more_sft"]} == {claim.QUICK.eval_rows}

        # The SFT row is spin_ray.stages.evaluate's measurement of θ_0: evaluating that model again, in a storage of its
        # own, gives the same greedy answers (task score) and the same log-probs (NLL).
        sft = run["sft"]["path"]
        assert run["spin"][0]["model"] == sft
        assert table[0]["task_score"]["mean"] == run["spin"][0]["task_score"]
        assert table[0]["nll_per_token"]["mean"] == run["spin"][0]["nll_per_token"]
        again = evaluate(claim.spin_config(claim.QUICK, sft, tmp_path / f"again-{regime}", 0), sft, 0)
        assert again["task_score"] == run["spin"][0]["task_score"]
        assert again["task_score_by_kind"] == run["spin"][0]["task_score_by_kind"]
        assert again["nll_per_token"] == pytest.approx(run["spin"][0]["nll_per_token"], rel=1e-5)
