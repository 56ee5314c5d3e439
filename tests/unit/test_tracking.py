"""Experiment tracking against the real trackers: a local MLflow file store and TensorBoard event files, read back.

The storage is written by hand in the stages' layout (train_metrics.jsonl, eval.json, manifest.json), one iteration
first and a second one later, as a resumed run would leave it; the loop's own call of the tracker is covered by
tests/integration/test_loop.py."""

import json
from pathlib import Path

import pytest

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.stages.tracking import Tracker, check_backend

from conftest import tensorboard_scalars, wandb_records


def write_iteration(storage: Path, t: int, steps: int) -> None:
    here = storage / f"iter_{t}"
    here.mkdir(parents=True)
    (here / "train_metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "total_steps": steps, "loss": 0.7 - 0.1 * s - t, "rewards/accuracies": 0.5,
                    "pairs": [0, 1]}) + "\n" for s in range(1, steps + 1)))
    (here / "eval.json").write_text(json.dumps({"theta": t + 1, "task_score": 0.3 + t / 10, "nll_per_token": 1.5,
                                                "reward_accuracy": 0.6, "rows": 8}))
    manifest = storage / "manifest.json"
    state = json.loads(manifest.read_text()) if manifest.exists() else {"stages": {}}
    state["stages"][f"iter_{t}"] = {"status": "done", "seconds": {"pairs": 10.0 + t, "train": 20.0}}
    manifest.write_text(json.dumps(state))


def base_eval(storage: Path) -> None:
    (storage / "base").mkdir(parents=True)
    (storage / "base" / "eval.json").write_text(json.dumps({"theta": 0, "task_score": 0.25, "nll_per_token": 1.6,
                                                            "reward_accuracy": None, "rows": 8}))


def cfg(storage: Path, backend: str, *extra: str) -> SpinConfig:
    return SpinConfig.load(None, [f"storage={storage}", f"tracking.backend={backend}", *extra])


def two_sessions(storage: Path, backend: str, *extra: str) -> None:
    """A run tracked by one command (θ_0's evaluation, iteration 0), then by its rerun after iteration 1 was added
    (synced twice: the second sync must log nothing)."""
    base_eval(storage)
    write_iteration(storage, 0, steps=3)
    tracker = Tracker(cfg(storage, backend, *extra))
    tracker.sync()
    tracker.close()
    write_iteration(storage, 1, steps=2)  # the rerun resumes: iteration 1 is new
    again = Tracker(cfg(storage, backend, *extra))
    again.sync()
    again.sync()
    again.close()


def test_mlflow_run_continues_across_reruns_and_logs_nothing_twice(tmp_path):
    from mlflow import MlflowClient

    storage, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    two_sessions(storage, "mlflow", f"tracking.uri={uri}", "train.beta=0.3")

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("spin_ray").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "run" and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert runs[0].data.params["train.beta"] == "0.3" and runs[0].data.params["tracking.backend"] == "mlflow"
    loss = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in loss] == [(1, 0.6), (2, 0.5), (3, 0.4), (4, -0.4), (5, -0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/task_score")] == [
        (0, 0.25), (1, 0.3), (2, 0.4)]
    assert [m.step for m in client.get_metric_history(run_id, "eval/reward_accuracy")] == [1, 2]  # θ_0 has none
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "seconds/pairs")] == [(0, 10.0), (1, 11.0)]
    assert json.loads((storage / "tracking.json").read_text())["run_id"] == run_id


def test_tensorboard_events_hold_each_step_once_across_reruns(tmp_path):
    storage = tmp_path / "run"
    write_iteration(storage, 0, steps=2)
    tracker = Tracker(cfg(storage, "tensorboard", "tracking.run_name=first"))
    tracker.sync()
    tracker.close()
    write_iteration(storage, 1, steps=1)
    again = Tracker(cfg(storage, "tensorboard", "tracking.run_name=first"))
    again.sync()
    again.close()
    scalars = tensorboard_scalars(storage / "tensorboard" / "first")

    def series(tag):
        return [s for s, _ in scalars[tag]], pytest.approx([v for _, v in scalars[tag]], rel=1e-6)

    assert series("train/loss") == ([1, 2, 3], [0.6, 0.5, -0.4])
    assert series("train/rewards/accuracies") == ([1, 2, 3], [0.5, 0.5, 0.5])
    assert series("eval/task_score") == ([1, 2], [0.3, 0.4])


def test_wandb_offline_run_continues_across_reruns_and_logs_nothing_twice(tmp_path, monkeypatch):
    # W&B offline (no account here): the run files are read back; `wandb sync` would upload them as one run.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    storage = tmp_path / "run"
    two_sessions(storage, "wandb", "train.beta=0.3")

    run_id = json.loads((storage / "tracking.json").read_text())["run_id"]
    records = wandb_records(storage / "wandb")
    assert {f for f, _ in records} == {f"run-{run_id}.wandb"}  # both sessions: one W&B run, resumed
    runs = [r.run for _, r in records if r.WhichOneof("record_type") == "run"]
    assert {(r.run_id, r.project, r.display_name) for r in runs} == {(run_id, "spin_ray", "run")}
    def key(item):  # W&B writes a key either whole or as its path
        return item.key or "/".join(item.nested_key)

    config = {key(i): json.loads(i.value_json) for _, r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["train.beta"] == 0.3 and config["tracking.backend"] == "wandb"
    rows = [{key(i): json.loads(i.value_json) for i in r.history.item} for _, r in records
            if r.WhichOneof("record_type") == "history"]

    def series(metric, axis):
        return [(row[axis], pytest.approx(row[metric])) for row in rows if metric in row]

    assert series("train/loss", "train/step") == [(1, 0.6), (2, 0.5), (3, 0.4), (4, -0.4), (5, -0.5)]
    assert series("eval/task_score", "eval/theta") == [(0, 0.25), (1, 0.3), (2, 0.4)]
    assert series("eval/reward_accuracy", "eval/theta") == [(1, 0.6), (2, 0.6)]  # θ_0 has none
    assert series("seconds/pairs", "seconds/iteration") == [(0, 10.0), (1, 11.0)]


def test_wandb_without_a_login_is_refused_before_any_work(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="tracking.backend = wandb needs a W&B login.*WANDB_MODE=offline"):
        check_backend(cfg(tmp_path, "wandb").tracking)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_backend(cfg(tmp_path, "wandb").tracking)


def test_a_missing_package_or_a_switched_backend_is_refused(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.backend = mlflow needs the mlflow package.*mlflow-skinny"):
        check_backend(cfg(tmp_path, "mlflow").tracking)
    monkeypatch.undo()
    Tracker(cfg(tmp_path / "run", "tensorboard")).close()
    with pytest.raises(ConfigError, match="tracking.backend = tensorboard; keep it, or delete tracking.json"):
        Tracker(cfg(tmp_path / "run", "mlflow"))
