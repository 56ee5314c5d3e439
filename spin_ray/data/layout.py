"""A run's layout under `storage` (a local path or an s3:// / gs:// URI): every path a stage writes or reads, and
the one rule for whether a stage's output is complete.

    prompts/*.parquet + _SUCCESS.json             the normalised prompts (prepare.py), read by every iteration
    prompts_eval/                                 the same for the held-out split
    iter_<t>/pairs/*.parquet + _SUCCESS.json      one iteration's SPIN pairs, with their token ids
    iter_<t>/pairs_given/                         pairs a caller gave train as a Ray Dataset
    iter_<t>/reference/*.parquet + _SUCCESS.json  θ_t's log-probs of the window's pairs (train.py's reference pass)
    iter_<t>/ray_train/                           Ray Train's resumable checkpoints, removed once θ_{t+1} is exported
    iter_<t>/model/ + _SUCCESS.json               θ_{t+1} in HF format
    iter_<t>/train_metrics.jsonl                  one line per optimizer step
    base/, iter_<k−1>/ eval.json, eval_samples.parquet   θ_0's, θ_k's held-out evaluation (evaluate.py)
    manifest.json, tracking.json, report.md (+ PNGs), mlflow.db, tensorboard/<run>/, logs/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from spin_ray.data import records
from spin_ray.logs import logs_dir

RESULT = "eval.json"
SAMPLES = "eval_samples.parquet"


@dataclass(frozen=True)
class RunLayout:
    storage: str

    @property
    def root(self) -> str:
        return records.absolute(self.storage)

    def _at(self, *parts: str) -> str:
        return records.join(self.root, *parts)

    @property
    def prompts(self) -> str:
        return self._at("prompts")

    @property
    def prompts_eval(self) -> str:
        return self._at("prompts_eval")

    def iteration(self, t: int) -> str:
        return self._at(f"iter_{t}")

    def pairs(self, t: int) -> str:
        return records.join(self.iteration(t), "pairs")

    def pairs_given(self, t: int) -> str:
        return records.join(self.iteration(t), "pairs_given")

    def reference(self, t: int) -> str:
        return records.join(self.iteration(t), "reference")

    def checkpoints(self, t: int) -> str:
        return records.join(self.iteration(t), "ray_train")

    def model(self, t: int) -> str:
        """θ_{t+1}, the HF folder iteration t trains."""
        return records.join(self.iteration(t), "model")

    def train_metrics(self, t: int) -> str:
        return records.join(self.iteration(t), "train_metrics.jsonl")

    def eval_dir(self, k: int) -> str:
        """Where θ_k's evaluation lives: beside its model (`iter_<k−1>/`), or `base/` for θ_0."""
        return self._at("base") if k == 0 else self.iteration(k - 1)

    def eval_result(self, k: int) -> str:
        return records.join(self.eval_dir(k), RESULT)

    def eval_samples(self, k: int) -> str:
        return records.join(self.eval_dir(k), SAMPLES)

    @property
    def manifest(self) -> str:
        return self._at("manifest.json")

    @property
    def tracking(self) -> str:
        return self._at("tracking.json")

    @property
    def mlflow_db(self) -> str:
        return self._at("mlflow.db")

    def tensorboard(self, run_name: str) -> str:
        return self._at("tensorboard", run_name)

    @property
    def report(self) -> str:
        return self._at("report.md")

    @property
    def report_training(self) -> str:
        return self._at("report_training.png")

    @property
    def report_eval(self) -> str:
        return self._at("report_eval.png")

    @property
    def logs(self) -> Path:
        """The engines' and workers' log files (logs.py: a local folder on each node, also for an object store)."""
        return logs_dir(self.storage)

    @staticmethod
    def done(uri: str) -> bool:
        """Whether a stage's output at `uri` is complete, the one rule every stage and resume apply: a records folder
        once its marker is in it (written last; locally the folder is a temp one until renamed into place), a single
        file (eval.json) once it exists (written whole: renamed from a temp name, or one object-store put).
        Static: a worker holding only a path applies it too."""
        fs, path = records.filesystem(uri)
        kind = fs.get_file_info(path).type
        return kind == pafs.FileType.File or (kind == pafs.FileType.Directory and records.is_complete(uri))

    def iterations(self) -> list[int]:
        """The iterations that have started (iter_0, iter_1, … present), in order."""
        ts: list[int] = []
        while records.exists(self.iteration(len(ts))):
            ts.append(len(ts))
        return ts

    def evaluation(self, k: int) -> dict[str, Any] | None:
        """θ_k's stored held-out evaluation; None until it is written."""
        uri = self.eval_result(k)
        return records.read_json(uri) if self.done(uri) else None
