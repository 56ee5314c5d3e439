"""spin_ray: SPIN (Self-Play Fine-Tuning, Chen et al. 2024) on Ray.

Library API (Ray must be initialised by the caller; nothing here calls ray.init or exits):

    cfg = SpinConfig.load("jobs/configs/cpu_default.yaml", ["storage=s3://bucket/spin"])
    result = run_iteration(cfg, prompts=ray_dataset, model=checkpoint_or_path)
    result.pairs.dataset()   # ray.data.Dataset of the iteration's pairs
    result.checkpoint        # ray.train.Checkpoint of θ_{t+1} (HF format)
    results = run(cfg)       # the whole loop
"""

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.loop import IterationResult, PairsResult, make_pairs, run, run_iteration
from spin_ray.loss import spin_loss
from spin_ray.train import TrainResult, train

__all__ = ["ConfigError", "IterationResult", "PairsResult", "SpinConfig", "TrainResult", "make_pairs", "run",
           "run_iteration", "spin_loss", "train"]
