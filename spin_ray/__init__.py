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

from importlib import import_module
from typing import Any

# Each name from the module that defines it, imported on first use: `import spin_ray` (and every `spin-ray` command,
# whose bad input is refused before anything heavy loads) does not pay for torch, transformers and Ray up front. No
# submodule or subpackage bears an API name, so `spin_ray.train` is always the function.
_HOMES = {"ConfigError": "config", "SpinConfig": "config", "evaluate": "stages.evaluate",
          "IterationResult": "stages.loop", "PairsResult": "stages.loop", "make_pairs": "stages.loop",
          "run": "stages.loop", "run_iteration": "stages.loop", "spin_loss": "training.loss",
          "write_report": "tools.report", "TrainResult": "stages.train", "train": "stages.train"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'spin_ray' has no attribute {name!r}")
    return getattr(import_module(f"spin_ray.{_HOMES[name]}"), name)
