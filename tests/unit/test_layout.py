"""RunLayout: every path of a run by name (a rename fails here: records on disk must not change), and the one rule for
whether a stage's output is complete."""

import os

import pyarrow as pa

from spin_ray.data import records
from spin_ray.data.layout import RunLayout


def test_every_path_keeps_its_name_locally_and_on_an_object_store(tmp_path):
    for storage, root in ((str(tmp_path / "run"), str(tmp_path / "run")), ("s3://bucket/run/", "s3://bucket/run")):
        layout = RunLayout(storage)
        assert layout.root.rstrip("/") == root
        assert {name: getattr(layout, name) for name in ("prompts", "prompts_eval", "manifest", "tracking",
                                                          "mlflow_db", "report", "report_training", "report_eval")} == {
            "prompts": f"{root}/prompts", "prompts_eval": f"{root}/prompts_eval",
            "manifest": f"{root}/manifest.json", "tracking": f"{root}/tracking.json", "mlflow_db": f"{root}/mlflow.db",
            "report": f"{root}/report.md", "report_training": f"{root}/report_training.png",
            "report_eval": f"{root}/report_eval.png"}
        assert layout.iteration(3) == f"{root}/iter_3"
        assert layout.pairs(3) == f"{root}/iter_3/pairs"
        assert layout.pairs_given(3) == f"{root}/iter_3/pairs_given"
        assert layout.reference(3) == f"{root}/iter_3/reference"
        assert layout.checkpoints(3) == f"{root}/iter_3/ray_train"
        assert layout.model(3) == f"{root}/iter_3/model"
        assert layout.train_metrics(3) == f"{root}/iter_3/train_metrics.jsonl"
        assert layout.tensorboard("spin") == f"{root}/tensorboard/spin"
        # θ_0's evaluation in base/, θ_k's beside the model that iteration k−1 trained.
        assert (layout.eval_dir(0), layout.eval_result(0), layout.eval_samples(0)) == (
            f"{root}/base", f"{root}/base/eval.json", f"{root}/base/eval_samples.parquet")
        assert (layout.eval_dir(2), layout.eval_result(2), layout.eval_samples(2)) == (
            f"{root}/iter_1", f"{root}/iter_1/eval.json", f"{root}/iter_1/eval_samples.parquet")
    assert RunLayout(str(tmp_path / "run")).logs == tmp_path / "run" / "logs"


def test_a_relative_storage_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunLayout("runs/x").pairs(0) == f"{tmp_path}/runs/x/iter_0/pairs"


def test_done_only_once_the_marker_is_written_or_the_file_is_whole(tmp_path):
    layout = RunLayout(str(tmp_path))
    pairs = layout.pairs(0)
    assert not layout.done(pairs)  # nothing yet
    # An interrupted local write: the temp folder beside the final name, even with its marker.
    work = f"{pairs}.tmp-0123abcd"
    os.makedirs(work)
    with open(os.path.join(work, records.MARKER), "w") as f:
        f.write("{}")
    assert not layout.done(pairs)
    # An object-store write in progress: parquet at the final name, no marker yet.
    os.makedirs(pairs)
    with open(os.path.join(pairs, "part-0.parquet"), "wb") as f:
        f.write(b"PAR1")
    assert not layout.done(pairs)
    records.write_table(pairs, pa.table({"prompt_id": ["a"]}), {"rows": 1})
    assert layout.done(pairs) and RunLayout.done(pairs)  # the rule needs no run: a worker holds only the path
    assert records.marker(pairs) == {"rows": 1}
    assert not [p for p in os.listdir(layout.iteration(0)) if ".tmp-" in p]

    assert not layout.done(layout.eval_result(0)) and layout.evaluation(0) is None
    records.write_json_atomic(layout.eval_result(0), {"theta": 0})
    assert layout.done(layout.eval_result(0)) and layout.evaluation(0) == {"theta": 0}


def test_iterations_are_the_consecutive_iter_folders(tmp_path):
    layout = RunLayout(str(tmp_path))
    assert layout.iterations() == []
    for t in (0, 1, 3):
        os.makedirs(layout.iteration(t))
    assert layout.iterations() == [0, 1]
