"""`spin-ray <command> [--config FILE.yaml] [--set dotted.key=value ...]`: parse, build the config, call the library.

This is the only place that calls ray.init or exits the process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from spin_ray.config import ConfigError, SpinConfig

log = logging.getLogger("spin_ray")

# Ray Train V2's report() waits for the controller's poll; the 2 s default dominates small steps.
ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(cfg: SpinConfig) -> None:
    """Join `ray.address` (or a running cluster), else start a local one; the env reaches every worker."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ENV_DEFAULTS}
    if cfg.ray.address is not None:
        ray.init(address=cfg.ray.address, runtime_env={"env_vars": env})
        return
    try:
        ray.init(address="auto", runtime_env={"env_vars": env})
    except ConnectionError:
        # More logical CPUs than cores lets Train workers and actor pools coexist on a laptop (they mostly wait).
        num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env})


def _generate(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.loop import make_pairs

    init_ray(cfg)
    result = make_pairs(cfg)
    return {"pairs": result.path, "rows": result.rows, "skipped": result.skipped, "bad_rows": result.bad_rows,
            "seconds": result.seconds}


def _train(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.train import train

    init_ray(cfg)
    result = train(cfg)
    return {"model": result.model, "skipped": result.skipped, "seconds": result.seconds, "metrics": result.metrics}


def _tiny_model(args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.models import build_tiny_model

    return {"model": build_tiny_model(args.out, seed=args.seed)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spin-ray", description="SPIN self-play fine-tuning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in [("generate", "θ_t answers every prompt and scores both answers: iter_<t>/pairs parquet"),
                       ("train", "train θ_{t+1} from θ_t on iter_<t>'s pairs window: iter_<t>/model")]:
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--config", help="YAML config; see jobs/configs/")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. --set train.beta=1.0 (repeatable; wins over the file)")
        c.add_argument("--debug", action="store_true", help="show tracebacks")
    t = sub.add_parser("tiny-model", help="build a tiny random Llama + tokenizer with a chat template, offline")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--debug", action="store_true")
    return p


COMMANDS = {"generate": _generate, "train": _train}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "tiny-model":
            out = _tiny_model(args)
        else:
            cfg = SpinConfig.load(args.config, args.overrides)
            out = COMMANDS[args.command](cfg, args)
    except (ConfigError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"spin-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
