"""`spin-ray <command> [--config FILE.yaml] [--set dotted.key=value ...]`: parse, build the config, call the library.

This is the only place that calls ray.init or exits the process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spin_ray.config import ConfigError, SpinConfig

EMBEDDED = str(Path(__file__).parent / "assets" / "cpu_default.yaml")

if TYPE_CHECKING:
    from spin_ray.loop import IterationResult

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


def iteration_row(r: "IterationResult") -> str:
    m, sec = r.metrics, r.seconds
    return (f"{r.iteration:>4} {r.pairs.rows:>6} {m.get('loss', float('nan')):>7.4f} {m.get('rewards/accuracies', 0):>6.3f} "
            f"{m.get('rewards/margins', 0):>8.3f} {sec.get('handoff', 0):>7.1f} {sec.get('generate', 0):>6.1f} "
            f"{sec.get('score', 0):>7.1f} {sec.get('pairs', 0):>7.1f} {sec.get('window', 0):>6.1f} "
            f"{sec.get('train', 0):>7.1f}  {r.model}")


# Seconds: handoff = engine start or in-place reload (warm engines); generate/score = actor busy time (they stream
# together, so they overlap inside `pairs` wall time); window = rescoring earlier pairs under θ_t; train = fit wall.
TABLE_HEADER = (f"{'iter':>4} {'pairs':>6} {'loss':>7} {'acc':>6} {'margin':>8} {'handoff':>7} {'gen s':>6} "
                f"{'score s':>7} {'pairs s':>7} {'window':>6} {'train s':>7}  model")


def _run(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.loop import run

    init_ray(cfg)
    print(TABLE_HEADER, flush=True)
    results = run(cfg, force=args.force, on_iteration=lambda r: print(iteration_row(r), flush=True))
    return {"storage": cfg.storage, "iterations": len(results), "model": results[-1].model if results else cfg.model,
            "seconds": [r.seconds for r in results]}


def _tiny_model(args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.models import build_tiny_model

    return {"model": build_tiny_model(args.out, seed=args.seed)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spin-ray", description="SPIN self-play fine-tuning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in [("generate", "θ_t answers every prompt and scores both answers: iter_<t>/pairs parquet"),
                       ("train", "train θ_{t+1} from θ_t on iter_<t>'s pairs window: iter_<t>/model"),
                       ("run", "the self-play loop: loop.iterations x (generate, score, train); resumes finished work")]:
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--config", help="YAML config; see jobs/configs/")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. --set train.beta=1.0 (repeatable; wins over the file)")
        c.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "run":
            c.add_argument("--force", action="store_true", help="continue a run whose config or data changed")
    t = sub.add_parser("tiny-model", help="build a tiny random Llama + tokenizer with a chat template, offline")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--debug", action="store_true")
    return p


COMMANDS = {"generate": _generate, "train": _train, "run": _run}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "tiny-model":
            out = _tiny_model(args)
        else:
            # No --config: the embedded CPU default (small real model, bundled data), so `spin-ray run` just works.
            cfg = SpinConfig.load(args.config or EMBEDDED, args.overrides)
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
