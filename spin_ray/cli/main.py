"""`spin-ray <command> [--config FILE.yaml] [--set dotted.key=value ...]`: parse, build the config, call the library.

This is the only place that calls ray.init (through `cluster`) or exits the process.
"""

from __future__ import annotations

import argparse
import errno
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spin_ray.assets import ASSETS
from spin_ray.cli.cluster import CommandCluster
from spin_ray.cli.output import (back_to_terminal, complain, log_file_for, logs_only, print_json, quiet_output, say,
                                  serve_log_file, start_output)
from spin_ray.cli.screens import PHASES, SCREENS
from spin_ray.config import ConfigError, SpinConfig
from spin_ray.models.builders import build_tiny_model

EMBEDDED = str(ASSETS / "cpu_default.yaml")

if TYPE_CHECKING:
    from spin_ray.tools.serve.config import ServeConfig

log = logging.getLogger("spin_ray")


def _prepare(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.data.prepare import prepare  # deferred (Ray Data, pyarrow): bad input is refused first

    out = prepare(cfg).summary()
    if cfg.eval.enabled:  # what `run` evaluates on, refused now if bad
        out["eval"] = prepare(cfg, heldout=True).summary()
    return out


def _generate(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.stages.loop import make_pairs  # deferred (Ray, vLLM): bad input is refused first

    result = make_pairs(cfg)
    return {"pairs": result.path, "rows": result.rows, "skipped": result.skipped, "bad_rows": result.bad_rows,
            "seconds": result.seconds}


def _train(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.stages.train import train  # deferred (Ray Train, torch): bad input is refused first

    result = train(cfg)
    return {"model": result.model, "skipped": result.skipped, "seconds": result.seconds, "metrics": result.metrics}


def _run(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    # Deferred (Ray, vLLM, torch, pyarrow): bad input is refused first.
    from spin_ray.data.layout import RunLayout
    from spin_ray.stages.loop import run
    from spin_ray.data.manifest import Manifest
    from spin_ray.tools.report import write_report

    results = run(cfg, force=args.force)
    report = write_report(cfg.storage)
    state = Manifest(cfg.storage).state
    selected = state.get("selected", {})
    thetas = [{"theta": 0, "model": state.get("model"), "evaluation": RunLayout(cfg.storage).evaluation(0),
               "train": None}]
    thetas += [{"theta": r.iteration + 1, "model": r.model, "evaluation": r.evaluation, "train": r.metrics}
               for r in results]
    phases = {k: round(sum(r.seconds.get(k, 0.0) for r in results), 1) for k in PHASES}
    return {"storage": cfg.storage, "iterations": len(results), "model": selected.get("model"), "selected": selected,
            "report": report, "thetas": thetas, "phases": phases, "seconds": [r.seconds for r in results]}


def _plan(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.tools.plan import make_plan, parse_cluster  # deferred (torch): bad input is refused first
    from spin_ray.training.memory import load_arch

    plan = make_plan(cfg, parse_cluster(args.cluster, args.cpus_per_node), load_arch(cfg.model, args.model_config),
                     prompts=args.prompts, prompt_tokens=args.prompt_tokens, answer_tokens=args.answer_tokens,
                     goal_hours=args.goal_hours)
    say(*plan.lines)
    return {"fits": plan.fits, "problems": plan.problems, "seconds_per_iteration": round(plan.seconds_per_iteration, 1),
            "gpus_by_phase": plan.gpus_by_phase}


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.tools.report import print_table, write_report  # deferred (pyarrow): bad input is refused first

    path = write_report(args.storage)
    say(*print_table(args.storage))
    return {"report": path}


def _tiny_model(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": build_tiny_model(args.out, seed=args.seed)}


def _serve_config(args: argparse.Namespace) -> "ServeConfig":
    from spin_ray.tools.serve.config import ServeConfig, resolve  # deferred (pyarrow): bad input is refused first

    iterations = [i.strip() for i in args.iterations.split(",") if i.strip()] if args.iterations else None
    cfg = ServeConfig(target=args.target, iterations=iterations, host=args.host, port=args.port, api_key=args.api_key,
                      replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                      max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                      max_tokens=args.max_tokens, max_model_len=args.max_model_len, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code)
    cfg.validate()
    cfg.models = resolve(cfg)  # refuse bad targets before Ray starts
    return cfg


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spin-ray", description="SPIN self-play fine-tuning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in [("prepare", "read, check, normalise and de-duplicate the data on the cluster: <storage>/prompts "
                                    "(and prompts_eval); the first step of generate and run"),
                       ("generate", "θ_t answers every prompt: iter_<t>/pairs parquet"),
                       ("train", "θ_t's reference log-probs, then train θ_{t+1} on iter_<t>'s pairs window: iter_<t>/model"),
                       ("run", "the self-play loop: loop.iterations x (generate, train); resumes finished work")]:
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--config", help="YAML config; see jobs/configs/")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. --set train.beta=1.0 (repeatable; wins over the file)")
        c.add_argument("--verbose", action="store_true",
                       help="show Ray's, vLLM's and the workers' logs here too (always in <storage>/logs/)")
        if name == "run":
            c.add_argument("--force", action="store_true", help="continue a run whose config or data changed")
    text = "size a run on a cluster without loading weights: stages, devices, memory and time; exit 1 if it cannot fit"
    c = sub.add_parser("plan", help=text, description=text)
    c.add_argument("--config", help="YAML config; see jobs/configs/")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--cluster", required=True, metavar="NODESxGPUSxTYPE", help="e.g. 1x8xH100, 4x8xA100-80GB, 1x0xCPU")
    c.add_argument("--model-config", help="the model's HF config.json (or its folder) when `model` is not shipped")
    c.add_argument("--prompts", type=int, help="prompts per iteration (default: data.max_rows or the known size)")
    c.add_argument("--prompt-tokens", type=float,
                   help="mean prompt tokens (default: a sample of the data through the model's template, where both "
                        "are at hand offline)")
    c.add_argument("--answer-tokens", type=float, help="mean human-answer tokens (default: likewise)")
    c.add_argument("--goal-hours", type=float, default=1.5,
                   help="the time per iteration a GPU plan is compared with (default 1.5)")
    c.add_argument("--cpus-per-node", type=int, help="CPUs per node (default: 12 per GPU; CPU nodes: this machine's)")
    text = "serve a run's models (base, iter_0, ...) or one model folder over an OpenAI-compatible HTTP API"
    c = sub.add_parser("serve", help=text, description=text)
    c.add_argument("target", help="a run's storage (serves `base` and each iter_<t>/model as iter_<t>) or a model folder")
    c.add_argument("--iterations", metavar="LIST", help="which of a run's models, e.g. base,0,2 (default: all)")
    c.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; others need --api-key)")
    c.add_argument("--port", type=int, default=8000)
    c.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every request")
    c.add_argument("--replicas", type=int, default=1, help="engine replicas per model (default 1)")
    c.add_argument("--num-cpus", type=float, help="CPUs per engine replica (default 1, or a share of fewer CPUs)")
    c.add_argument("--num-gpus", type=float, help="GPUs per engine replica (default: 1 if the cluster has GPUs)")
    c.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    c.add_argument("--max-prompt-tokens", type=int, default=2048, help="largest prompt (default 2048 tokens)")
    c.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask (default 512)")
    c.add_argument("--max-model-len", type=int, help="engine context length (default: the model's)")
    c.add_argument("--dtype", default="auto", help="engine dtype (default: float32 on CPU, bfloat16 on GPU)")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="let a model's own Python code (config.json auto_map) run; off by default")
    c.add_argument("--verbose", action="store_true",
                   help="show Ray's, Serve's and vLLM's logs here too, with a line per request (always in the log file)")
    text = "a run's held-out evaluation per model, training curves and plots: <storage>/report.md + PNGs"
    c = sub.add_parser("report", help=text, description=text)
    c.add_argument("storage", help="a run's storage (local path or s3:// / gs:// URI)")
    t = sub.add_parser("tiny-model", help="build a tiny random Llama + tokenizer with a chat template, offline")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    for c in sub.choices.values():
        c.add_argument("--debug", action="store_true", help="show tracebacks")
        c.add_argument("--json", action="store_true",
                       help="print the result as one JSON object on stdout (progress and summary go to stderr)")
    return p


COMMANDS = {"prepare": _prepare, "generate": _generate, "train": _train, "run": _run, "plan": _plan}
# Commands that start Ray: their Ray/vLLM/worker logs go to a file unless --verbose.
QUIET = ("prepare", "generate", "train", "run")


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parser().parse_args(argv)
    start_output(args.json)
    ray_cluster = CommandCluster(args.command)
    log_path = None
    try:
        if args.command == "tiny-model":
            out = _tiny_model(args)
        elif args.command == "report":
            out = _report(args)
        elif args.command == "serve":
            from spin_ray.tools.serve.app import serve_until_stopped  # deferred (Ray Serve): bad input is refused first

            serve_cfg = _serve_config(args)
            # Unless --verbose, Ray's, Serve's and vLLM's lines (and one per request) go to the file.
            log_path = None if args.verbose else serve_log_file(args.target)
            _start_ray(ray_cluster, SpinConfig(), None, log_path, "--verbose shows it here, with a line per request")
            out = serve_until_stopped(serve_cfg, on_ready=say)
        else:
            # No --config: the embedded CPU default (small real model, bundled data), so `spin-ray run` just works.
            cfg = SpinConfig.load(args.config or EMBEDDED, args.overrides)
            if args.command in QUIET:
                from spin_ray.stages.loop import check_inputs  # deferred (Ray, pyarrow): bad input is refused first

                check_inputs(cfg, args.command)  # bad storage, data or model: one paragraph before Ray starts
                log_path = None if args.verbose else log_file_for(cfg.storage, args.command)
                _start_ray(ray_cluster, cfg, cfg.storage, log_path, "--verbose shows it here")
            out = COMMANDS[args.command](cfg, args)
    except (ConfigError, FileNotFoundError) as e:
        ray_cluster.stop_watching()
        if args.debug:
            back_to_terminal()  # the traceback Python prints next belongs on the terminal
            raise
        complain(f"spin-ray {args.command}: error: {e}")
        return 2
    except Exception as e:
        if ray_cluster.stop_watching() and ray_cluster.gone():  # the error Ray raised is only the symptom
            complain(ray_cluster.lost_text())
            log.exception("spin-ray %s failed: the Ray cluster went away", args.command)
            return 1
        if args.debug or log_path is None:
            back_to_terminal()
            raise
        log.exception("spin-ray %s failed", args.command)
        if _disk_full(e):
            complain(f"spin-ray {args.command}: failed: No space left on device while writing under {cfg.storage} "
                     "(or Ray's temp folder). Free space there, or point `storage` elsewhere, and rerun the same "
                     f"command: finished stages are kept. Details in {log_path}.")
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            complain(f"spin-ray {args.command}: failed: {type(e).__name__}: {first}\nThe traceback and the workers' "
                     f"logs are in {log_path}; rerun the same command to resume (finished stages are kept).")
        return 1
    finally:
        ray_cluster.stop_watching()
        logs_only()
    if args.command == "run":
        out["total_seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print_json(out)
    else:
        say(*SCREENS[args.command](out))
    return 1 if out.get("fits") is False else 0  # `plan`: the cluster cannot hold the run


def _start_ray(ray_cluster: CommandCluster, cfg: SpinConfig, storage: str | None, log_path: Path | None,
               verbose_note: str) -> None:
    """Start the command's Ray cluster, its output quiet (into `log_path`) unless that is None (--verbose)."""
    if log_path is not None:
        quiet_output(log_path)
    ray_cluster.start(cfg, storage, log_path)
    if log_path is not None:
        say(f"spin-ray {ray_cluster.command}: full log in {log_path} ({verbose_note})")


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain, or in the text of a worker's error (Ray re-raises it as another type)."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
