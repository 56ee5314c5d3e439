"""Experiment tracking (`tracking.backend`: mlflow, wandb, tensorboard): a run's records mirrored into a tracker.

Like the report, it reads only what the stages wrote (manifest.json, iter_<t>/train_metrics.jsonl, base/eval.json,
iter_<t>/eval.json), so the tracker shows exactly what is on storage, whichever process trained. `sync` logs what is
new since the last call: the config as params once, every training step (x = the run's global step), each model's
held-out evaluation (x = θ index k) and each iteration's seconds per stage (x = t). What was logged and the tracker's
run id are kept in `<storage>/tracking.json`, so a rerun or a resumed run continues the same tracker run and logs
nothing twice. One process (the driver) logs: there is one writer per run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import posixpath
import time
import uuid
from pathlib import Path
from typing import Any

from spin_ray.config import ConfigError, SpinConfig, TrackingConfig
from spin_ray.data import records
from spin_ray.data.layout import RunLayout

PACKAGES = {"mlflow": ("mlflow", "pip install mlflow-skinny sqlalchemy alembic"), "wandb": ("wandb", "pip install wandb"),
            "tensorboard": ("tensorboardX", "pip install tensorboardX")}
AXES = {"train": "train/step", "eval": "eval/theta", "seconds": "seconds/iteration"}
"""W&B: each metric family's x-axis, logged as a metric of its own (a W&B run has one monotonic step)."""
EVAL_KEYS = ("task_score", "nll_per_token", "reward_accuracy", "reward_margin", "answer_tokens", "truncated_share")


def check_backend(tc: TrackingConfig) -> None:
    """Refuse, before any work starts, a backend whose package is not installed."""
    if tc.backend == "none":
        return
    module, install = PACKAGES[tc.backend]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"tracking.backend = {tc.backend} needs the {module} package, which is not installed here: "
                          f"{install} (in the environment of the command), or set tracking.backend=none")
    if tc.backend == "wandb" and not _wandb_can_log():
        raise ConfigError("tracking.backend = wandb needs a W&B login for this command: set WANDB_API_KEY (or run "
                          "`wandb login`), or WANDB_MODE=offline to keep the run's files locally for `wandb sync` "
                          "later, or set tracking.backend=none")


def _wandb_can_log() -> bool:
    """Offline, or a key for W&B's host in the environment or ~/.netrc (where `wandb login` writes it)."""
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (the same keys as --set)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    """One tracker run per storage; `sync()` after each stage, `close()` at the end."""

    def __init__(self, cfg: SpinConfig):
        check_backend(cfg.tracking)
        self.cfg, self.tc = cfg, cfg.tracking
        self.layout = RunLayout(cfg.storage)
        self.root = self.layout.root
        self.state_uri = self.layout.tracking
        self.state: dict[str, Any] = records.read_json(self.state_uri) if records.exists(self.state_uri) else {}
        if self.state and self.state.get("backend") != self.tc.backend:
            raise ConfigError(f"{self.state_uri} tracks this run with tracking.backend = {self.state.get('backend')}; "
                              f"keep it, or delete {posixpath.basename(self.state_uri)} to start a new tracker run "
                              f"with {self.tc.backend}")
        self.state.update(backend=self.tc.backend)
        self.state.setdefault("steps", {})  # iteration -> training steps logged
        self.state.setdefault("evals", [])  # θ indices whose evaluation was logged
        self.state.setdefault("seconds", [])  # iterations whose stage timings were logged
        self.state.setdefault("lm_eval", {})  # θ index -> eval.lm_eval tasks whose scores were logged
        name = self.tc.run_name or Path(self.root.rstrip("/")).name
        if self.tc.backend == "mlflow":
            import mlflow

            self.client = mlflow.MlflowClient(self.tc.uri or f"sqlite:///{self.layout.mlflow_db}")
            if "run_id" not in self.state:
                experiment = self.client.get_experiment_by_name(self.tc.project)
                experiment_id = (experiment.experiment_id if experiment
                                 else self.client.create_experiment(self.tc.project))
                self.state["run_id"] = self.client.create_run(experiment_id, run_name=name).info.run_id
            else:
                self.client.update_run(self.state["run_id"], status="RUNNING")
        elif self.tc.backend == "wandb":
            import wandb

            # Our own id, kept in tracking.json: a rerun resumes the same W&B run.
            run_id = self.state.setdefault("run_id", uuid.uuid4().hex[:12])
            local = "://" not in self.root
            self.run = wandb.init(project=self.tc.project, name=name, id=run_id, resume="allow",
                                  dir=self.tc.uri or (self.root if local else None))
            for family, axis in AXES.items():
                self.run.define_metric(axis)
                self.run.define_metric(f"{family}/*", step_metric=axis)
        else:
            from tensorboardX import SummaryWriter

            # A new event file per session (TensorBoard reads them all); its own suffix, or a rerun within the same
            # second would reuse the name and truncate the earlier file.
            self.writer = SummaryWriter(self.tc.uri or self.layout.tensorboard(name),
                                        filename_suffix=f".{time.time_ns()}")
        if not self.state.get("params"):
            self._params(flat(cfg.to_dict()))
            self.state["params"] = True
        self._save()

    def sync(self) -> None:
        """Log what the stages wrote since the last call."""
        step0 = 0
        iterations = self.layout.iterations()
        for t in iterations:
            lines = records.read_lines(self.layout.train_metrics(t))
            done = self.state["steps"].get(str(t), 0)
            for line in lines[done:]:
                m = json.loads(line)
                self._metrics({f"train/{k}": v for k, v in m.items() if k not in ("step", "pairs")},
                              step0 + m["step"])
            self.state["steps"][str(t)] = max(done, len(lines))
            step0 += len(lines)
        for k in range(len(iterations) + 1):
            evaluation = self.layout.evaluation(k)
            if evaluation is not None and k not in self.state["evals"]:
                self._metrics({f"eval/{key}": evaluation.get(key) for key in EVAL_KEYS}, k)
                self.state["evals"].append(k)
            # lm-eval's scores may be added to a stored evaluation later (eval.lm_eval set on a rerun): logged apart.
            harness = (evaluation or {}).get("lm_eval") or {}
            logged = self.state["lm_eval"].setdefault(str(k), [])
            new = [task for task in harness if task not in logged]
            if new:
                self._metrics({f"eval/lm_eval/{row}/{metric}": value for task in new
                               for row, metrics in harness[task]["scores"].items()
                               for metric, value in metrics.items()}, k)
                logged += new
        manifest = self.layout.manifest
        stages = records.read_json(manifest).get("stages", {}) if records.exists(manifest) else {}
        for name, stage in stages.items():
            t = int(name.removeprefix("iter_"))
            if stage.get("status") == "done" and t not in self.state["seconds"]:
                self._metrics({f"seconds/{k}": v for k, v in (stage.get("seconds") or {}).items()}, t)
                self.state["seconds"].append(t)
        self._save()

    def close(self, ok: bool = True) -> None:
        if self.tc.backend == "mlflow":
            self.client.set_terminated(self.state["run_id"], status="FINISHED" if ok else "FAILED")
        elif self.tc.backend == "wandb":
            self.run.finish(exit_code=0 if ok else 1)
        else:
            self.writer.close()

    def _metrics(self, metrics: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tc.backend == "mlflow":
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.state["run_id"], metrics=[Metric(k, v, now, step) for k, v in numbers.items()])
        elif self.tc.backend == "wandb" and numbers:
            families = {k.split("/", 1)[0] for k in numbers}
            self.run.log({**numbers, **{AXES[f]: step for f in families}})
        else:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def _params(self, params: dict[str, Any]) -> None:
        if self.tc.backend == "mlflow":
            from mlflow.entities import Param

            items = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.state["run_id"], params=items[i:i + 100])
        elif self.tc.backend == "wandb":
            self.run.config.update(params, allow_val_change=True)
        else:
            self.writer.add_text("config", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in params.items()), 0)

    def _save(self) -> None:
        records.write_json_atomic(self.state_uri, self.state)
