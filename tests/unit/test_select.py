"""Which iterate a run keeps (loop.select): the rule by hand, and where the choice shows (report, serve)."""

import json

from spin_ray.stages.evaluate import best_iterate


def ev(task, nll):
    return {"task_score": task, "nll_per_token": nll}


def test_best_by_task_score_then_nll_then_the_earlier():
    assert best_iterate([ev(0.25, 1.6), ev(0.30, 1.7), ev(0.28, 1.5)]) == (1, "task_score")
    assert best_iterate([ev(0.25, 1.6), ev(0.30, 1.7), ev(0.30, 1.65)]) == (2, "task_score")  # tie: lower NLL
    assert best_iterate([ev(0.30, 1.6), ev(0.30, 1.6)]) == (0, "task_score")  # full tie: the earlier
    assert best_iterate([None, ev(0.1, 2.0), ev(0.2, 2.1)]) == (2, "task_score")  # θ_0 not evaluated


def test_best_by_nll_without_task_scores_and_none_without_evaluations():
    assert best_iterate([ev(None, 1.9), ev(None, 1.7), ev(None, 1.8)]) == (1, "nll_per_token")
    assert best_iterate([None, None]) is None


def test_the_kept_iterate_is_served_as_best_and_named_in_the_report(tiny_model, tmp_path):
    from spin_ray.models.builders import build_tiny_model
    from spin_ray.tools.report import table
    from spin_ray.tools.serve.config import ServeConfig, resolve

    theta1 = build_tiny_model(tmp_path / "iter_0" / "model", seed=1)
    (tmp_path / "iter_0" / "model" / "_SUCCESS.json").write_text("{}")
    selected = {"theta": 1, "model": theta1, "rule": "best", "by": "task_score", "value": 0.3}
    (tmp_path / "manifest.json").write_text(json.dumps({"model": tiny_model, "selected": selected,
                                                        "stages": {"iter_0": {"status": "done", "model": theta1}}}))
    models = resolve(ServeConfig(str(tmp_path)))
    assert models == {"base": tiny_model, "iter_0": theta1, "best": theta1}
    assert resolve(ServeConfig(str(tmp_path), iterations=["best"])) == {"best": theta1}
    rows = table({"models": [{"theta": 0, "evaluation": ev(0.2, 1.8), "seconds": {}},
                             {"theta": 1, "evaluation": ev(0.3, 1.7), "seconds": {}}], "selected": selected})
    assert "θ_1 (iter_0) **kept** (best)" in rows[3] and "kept" not in rows[2]
    # loop.select = last: nothing extra to serve.
    selected["rule"], selected["by"] = "last", None
    (tmp_path / "manifest.json").write_text(json.dumps({"model": tiny_model, "selected": selected}))
    assert set(resolve(ServeConfig(str(tmp_path)))) == {"base", "iter_0"}
