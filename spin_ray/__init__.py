"""spin_ray: SPIN (Self-Play Fine-Tuning, Chen et al. 2024) on Ray.

Library API (Ray must be initialised by the caller; nothing here calls ray.init or exits):

    cfg = SpinConfig.load("jobs/configs/cpu_default.yaml", ["storage=s3://bucket/spin"])
    result = run_iteration(cfg, prompts=ray_dataset, model=checkpoint_or_path)
    result.pairs.dataset()   # ray.data.Dataset of the iteration's pairs
    result.checkpoint        # ray.train.Checkpoint of θ_{t+1} (HF format)
    result.evaluation        # θ_{t+1} on held-out prompts (task score, NLL, reward accuracy vs θ_t)
    results = run(cfg)       # the whole loop
    write_report(cfg.storage)  # report.md + PNGs from the run's records
"""

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.evaluate import evaluate
from spin_ray.loop import IterationResult, PairsResult, make_pairs, run, run_iteration
from spin_ray.loss import spin_loss
from spin_ray.report import write_report
from spin_ray.train import TrainResult, train

__all__ = ["ConfigError", "IterationResult", "PairsResult", "SpinConfig", "TrainResult", "evaluate", "make_pairs",
           "run", "run_iteration", "spin_loss", "train", "write_report"]
