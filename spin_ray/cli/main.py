"""`spin-ray <command> [--config FILE.yaml] [--set dotted.key=value ...]`: parse, build the config, call the library.

This is the only place that calls ray.init or exits the process.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from spin_ray.assets import ASSETS
from spin_ray.config import ConfigError, SpinConfig

EMBEDDED = str(ASSETS / "cpu_default.yaml")

if TYPE_CHECKING:
    from spin_ray.tools.serve import ServeConfig

log = logging.getLogger("spin_ray")


# The terminal, kept when quiet mode points fd 1 and 2 (and sys.stdout/stderr) at the log file; None: not quiet.
_console: IO[str] | None = None
_console_err: IO[str] | None = None
# --json: stdout carries the result object alone, so progress and the summary go to stderr.
_json = False


def say(*lines: str) -> None:
    """Print progress and results to the terminal (stderr under --json)."""
    stream = (_console_err or sys.stderr) if _json else (_console or sys.stdout)
    for line in lines:
        print(line, file=stream, flush=True)


def complain(text: str) -> None:
    """Print an error paragraph to the terminal's stderr."""
    print(text, file=_console_err or sys.stderr, flush=True)


class _ConsoleFilter(logging.Filter):
    """spin_ray's own progress lines only: Ray, vLLM and transformers go to the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("spin_ray") and record.levelno >= logging.INFO


def log_file_for(storage: str, command: str) -> Path:
    """`<storage>/logs/<command>-<time>.log`; object-store runs log under ~/.cache/spin_ray/logs."""
    from spin_ray.logs import logs_dir

    return logs_dir(storage) / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def quiet_output(log_path: Path) -> None:
    """Send everything written to stdout/stderr (Ray, vLLM and C++ logs included) to `log_path`; keep the terminal
    for spin_ray's progress lines, the results and errors."""
    global _console, _console_err
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_out, terminal_err = os.dup(1), os.dup(2)
    sink = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)
    _console = os.fdopen(terminal_out, "w", buffering=1)
    _console_err = os.fdopen(terminal_err, "w", buffering=1)
    # Ray prints the workers' output to sys.stdout/sys.stderr: both go to the file.
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout, force=True)
    terminal = logging.StreamHandler(_console_err if _json else _console)
    terminal.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    terminal.addFilter(_ConsoleFilter())
    logging.getLogger().addHandler(terminal)
    # Progress bars of every Ray Data execution would fill the log; the stage lines say the same.
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


@dataclass(frozen=True)
class Cluster:
    """The Ray cluster a command uses: `address` to join, or None for a local cluster of its own."""

    address: str | None
    named_by: str
    num_cpus: int | None = None

    def describe(self) -> str:
        if self.address is None:
            return (f"a local Ray cluster of its own with {self.num_cpus} CPUs (set RAY_ADDRESS or ray.address, or "
                    "`ray start` one, to use another)")
        return f"joining the Ray cluster at {self.address} (named by {self.named_by})"


def _reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether something listens at `host:port` (a GCS); False for what is not such an address."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def choose_cluster(cfg: SpinConfig) -> Cluster:
    """Join only what the user named: `ray.address`, RAY_ADDRESS (also what `ray job submit` sets), or a live cluster
    started with `ray start` (Ray's address file, which only `ray start` writes). Never another program's private
    `ray.init()` cluster, which ends with its owner: otherwise the command starts a local cluster of its own."""
    from ray._common.utils import get_ray_address_file

    if cfg.ray.address is not None:
        return Cluster(cfg.ray.address, "ray.address")
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "local":
        return Cluster(env, "RAY_ADDRESS")
    address_file = Path(get_ray_address_file(None))
    if not env and address_file.exists():
        started = address_file.read_text().strip()
        if _reachable(started):
            return Cluster(started, f"`ray start`, {address_file}")
        log.info("ignoring %s: no Ray cluster answers at %s", address_file, started)
    # More logical CPUs than cores lets Train workers and actor pools coexist on a laptop (they mostly wait).
    return Cluster(None, "default", num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1))


def init_ray(cluster: Cluster) -> None:
    """Join or start `cluster`. The environment spin_ray's engines and workers need travels with them (generate.
    engine_env, the Train run's worker env), as for a library caller's own ray.init()."""
    import ray

    if cluster.address is None:
        # The dashboard process serves Ray's state API, which Ray Train's placement-group cleaner polls; without it
        # the cleaner cannot see a dead controller (and logs a warning every second). Loopback only.
        ray.init(address="local", num_cpus=cluster.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
        return
    # `ray start` turns on token auth when a token exists (~/.ray/auth_token); a joining driver must send it too.
    # Sending it to a cluster without auth is harmless.
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    ray.init(address=cluster.address)


class ClusterWatch:
    """Ends the command with one paragraph when its Ray cluster goes away (its owner exited, `ray stop`, the head
    lost). Ray itself would block on the dead GCS for up to a minute and then end the process with nothing said."""

    def __init__(self, address: str, on_lost: Callable[[str], None], every_s: float = 1.0, misses: int = 3):
        self.address, self.on_lost, self.every_s, self.misses = address, on_lost, every_s, misses
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="spin-ray-cluster-watch")
        self.thread.start()

    def gone(self) -> bool:
        """Whether the cluster's GCS stays unreachable for `misses` checks."""
        for i in range(self.misses):
            if _reachable(self.address):
                return False
            if i + 1 < self.misses:
                time.sleep(self.every_s)
        return True

    def _watch(self) -> None:
        missed = 0
        while not self._stop.wait(self.every_s):
            missed = 0 if _reachable(self.address) else missed + 1
            if missed >= self.misses:
                with self._lock:
                    if not self._stop.is_set():
                        self.on_lost(self.address)
                return

    def stop(self) -> None:
        """No paragraph after this: the command is ending on its own (and may shut its local cluster down)."""
        with self._lock:
            self._stop.set()


class _LastProgress(logging.Handler):
    """Remembers spin_ray's last progress line: what the command was doing when its cluster went away."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.line = "starting"

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:  # progress, not warnings or the command's own failure
            self.line = record.getMessage()


class CommandCluster:
    """The Ray cluster of one CLI command: says which it is (the command's first line), joins or starts it, and
    ends the command with one paragraph, exit code 1, if it goes away."""

    def __init__(self, command: str):
        self.command = command
        self.progress = _LastProgress()
        logging.getLogger("spin_ray").addHandler(self.progress)
        self.cluster: Cluster | None = None
        self.watch: ClusterWatch | None = None
        self.storage: str | None = None
        self.log_path: Path | None = None

    def start(self, cfg: SpinConfig, storage: str | None, log_path: Path | None) -> None:
        import ray

        self.cluster, self.storage, self.log_path = choose_cluster(cfg), storage, log_path
        say(f"spin-ray {self.command}: {self.cluster.describe()}")
        init_ray(self.cluster)
        self.watch = ClusterWatch(ray.get_runtime_context().gcs_address, self._lost)

    def lost_text(self) -> str:
        assert self.cluster is not None and self.watch is not None
        if self.cluster.address is None:
            whose = f"This command's own local Ray cluster ({self.watch.address})"
        else:
            whose = f"The Ray cluster at {self.watch.address} (named by {self.cluster.named_by})"
        if self.storage is None:
            rerun = "Rerun the same command once a cluster is up."
        else:
            rerun = (f"Finished stages are kept under {self.storage}; rerun the same command to resume (start the "
                     "cluster again, or leave RAY_ADDRESS and ray.address unset for a local one).")
        details = f" Details in {self.log_path}." if self.log_path else ""
        return (f"spin-ray {self.command}: failed: {whose} went away while: {self.progress.line}. "
                f"{rerun}{details}")

    def _lost(self, address: str) -> None:
        complain(self.lost_text())
        if _console is not None:  # quiet: the log file gets it too
            print(self.lost_text(), file=sys.stderr, flush=True)
        os._exit(1)  # from the watch thread: the main thread may be blocked on the dead cluster

    def stop_watching(self) -> bool:
        """Stop the watch (the command is ending on its own); whether one was running."""
        if self.watch is None:
            return False
        self.watch.stop()
        return True

    def gone(self) -> bool:
        return self.watch is not None and self.watch.gone()


def _prepare(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.data.prepare import prepare

    out = prepare(cfg).summary()
    if cfg.eval.enabled:  # what `run` evaluates on, refused now if bad
        out["eval"] = prepare(cfg, heldout=True).summary()
    return out


def _generate(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.stages.loop import make_pairs

    result = make_pairs(cfg)
    return {"pairs": result.path, "rows": result.rows, "skipped": result.skipped, "bad_rows": result.bad_rows,
            "seconds": result.seconds}


def _train(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.stages.train import train

    result = train(cfg)
    return {"model": result.model, "skipped": result.skipped, "seconds": result.seconds, "metrics": result.metrics}


# The phases of an iteration (IterationResult.seconds) in the order they run, as the last screen names them.
# `train` includes `reference` (θ_t's log-probs of the window's pairs, computed inside the fit).
PHASES = {"engines": "engine start", "pairs": "generation", "train": "training", "reference": "of which reference",
          "eval": "evaluation"}


def _run(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.stages.evaluate import read_eval
    from spin_ray.stages.loop import run
    from spin_ray.data.manifest import Manifest
    from spin_ray.tools.report import write_report

    results = run(cfg, force=args.force)
    report = write_report(cfg.storage)
    state = Manifest(cfg.storage).state
    selected = state.get("selected", {})
    thetas = [{"theta": 0, "model": state.get("model"), "evaluation": read_eval(cfg.storage, 0), "train": None}]
    thetas += [{"theta": r.iteration + 1, "model": r.model, "evaluation": r.evaluation, "train": r.metrics}
               for r in results]
    phases = {k: round(sum(r.seconds.get(k, 0.0) for r in results), 1) for k in PHASES}
    return {"storage": cfg.storage, "iterations": len(results), "model": selected.get("model"), "selected": selected,
            "report": report, "thetas": thetas, "phases": phases, "seconds": [r.seconds for r in results]}


def _run_screen(out: dict[str, Any]) -> list[str]:
    """The run's last screen: each θ on the held-out prompts (h-acc: its reward accuracy against the θ before it, 0.5
    at the fixed point; loss and acc: the last training step that made it), the θ kept, the report, the time."""
    kept = out["selected"] or {}
    lines = [f"{'':>2}{'θ':<4} {'task':>6} {'nll':>6} {'h-acc':>6} {'loss':>7} {'acc':>6}  model"]
    for row in out["thetas"]:
        ev, tr = row["evaluation"] or {}, row["train"] or {}
        lines.append(f"{'* ' if kept.get('theta') == row['theta'] else '  '}{'θ_' + str(row['theta']):<4} "
                     f"{_num(ev.get('task_score')):>6} {_num(ev.get('nll_per_token')):>6} "
                     f"{_num(ev.get('reward_accuracy')):>6} {_num(tr.get('loss'), '.4f'):>7} "
                     f"{_num(tr.get('rewards/accuracies')):>6}  {row['model']}")
    if kept:
        by = f"best held-out {kept['by'].replace('_', ' ')}" if kept.get("by") else f"loop.select = {kept['rule']}"
        lines.append(f"kept (*): θ_{kept['theta']} ({by}) at {kept['model']}")
    lines.append(f"report: {out['report']}")
    lines.append(_time_line(out))
    return lines


def _time_line(out: dict[str, Any]) -> str:
    phases = out["phases"]
    other = out["total_seconds"] - sum(v for k, v in phases.items() if k != "reference")
    split = [f"{name} {phases[k]:.1f}" for k, name in PHASES.items()]
    return f"total {out['total_seconds']:.1f} s: " + ", ".join(split) + f"; Ray start, data and report {max(other, 0):.1f}"


def _num(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _plan(cfg: SpinConfig, args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.tools.plan import load_arch, make_plan, parse_cluster

    plan = make_plan(cfg, parse_cluster(args.cluster, args.cpus_per_node), load_arch(cfg.model, args.model_config),
                     prompts=args.prompts, prompt_tokens=args.prompt_tokens, answer_tokens=args.answer_tokens,
                     goal_hours=args.goal_hours)
    say(*plan.lines)
    return {"fits": plan.fits, "problems": plan.problems, "seconds_per_iteration": round(plan.seconds_per_iteration, 1),
            "gpus_by_phase": plan.gpus_by_phase}


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.tools.report import print_table, write_report

    path = write_report(args.storage)
    say(*print_table(args.storage))
    return {"report": path}


def _prepared_line(what: str, out: dict[str, Any]) -> str:
    bad = sum(out["bad_rows"].values())
    done = "already there" if out["skipped"] else f"in {out['seconds']:.1f} s"
    return (f"{what}: {out['rows']} at {out['prompts']} ({done}; {out['duplicates']} duplicates dropped, {bad} bad "
            "rows skipped)")


# What each command leaves on the terminal without --json: a few lines for a person. (run: _run_screen; plan and
# report have printed theirs already.)
SCREENS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "prepare": lambda out: [_prepared_line("prompts", out)] + ([_prepared_line("held-out prompts", out["eval"])]
                                                               if "eval" in out else []),
    "generate": lambda out: [f"pairs: {out['rows']} at {out['pairs']}" + (" (already there)" if out["skipped"] else
                                                                          f" in {out['seconds']['pairs']:.1f} s")],
    "train": lambda out: [f"model: {out['model']}" + (" (already there)" if out["skipped"] else
                                                      f", trained in {out['seconds']:.1f} s")],
    "run": lambda out: _run_screen(out),
    "plan": lambda out: [],
    "report": lambda out: [f"report: {out['report']}"],
    "tiny-model": lambda out: [f"model: {out['model']}"],
    "serve": lambda out: [f"stopped serving {', '.join(out['served'])}"],
}


def _tiny_model(args: argparse.Namespace) -> dict[str, Any]:
    from spin_ray.models.builders import build_tiny_model

    return {"model": build_tiny_model(args.out, seed=args.seed)}


def _serve_config(args: argparse.Namespace) -> "ServeConfig":
    from spin_ray.tools.serve import ServeConfig, resolve

    iterations = [i.strip() for i in args.iterations.split(",") if i.strip()] if args.iterations else None
    cfg = ServeConfig(target=args.target, iterations=iterations, host=args.host, port=args.port, api_key=args.api_key,
                      replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                      max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                      max_tokens=args.max_tokens, max_model_len=args.max_model_len, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code)
    cfg.validate()
    cfg.models = resolve(cfg)  # refuse bad targets before Ray starts
    return cfg


def _serve_log(target: str) -> Path:
    """A run's `<storage>/logs/serve-<time>.log`; a model folder is not written to, so ~/.cache/spin_ray/logs."""
    from spin_ray.models.loading import cache_root

    if (Path(target).expanduser() / "manifest.json").is_file():
        return log_file_for(target, "serve")
    return cache_root() / "logs" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.log"


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
    global _json
    started = time.perf_counter()
    args = parser().parse_args(argv)
    _json = args.json
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ray_cluster = CommandCluster(args.command)
    log_path = None
    try:
        if args.command == "tiny-model":
            out = _tiny_model(args)
        elif args.command == "report":
            out = _report(args)
        elif args.command == "serve":
            from spin_ray.tools.serve import serve_until_stopped

            serve_cfg = _serve_config(args)
            if not args.verbose:  # Ray's, Serve's and vLLM's lines (and one per request) go to the file
                log_path = _serve_log(args.target)
                quiet_output(log_path)
            ray_cluster.start(SpinConfig(), None, log_path)
            if log_path is not None:
                say(f"spin-ray serve: full log in {log_path} (--verbose shows it here, with a line per request)")
            out = serve_until_stopped(serve_cfg, on_ready=say)
        else:
            # No --config: the embedded CPU default (small real model, bundled data), so `spin-ray run` just works.
            cfg = SpinConfig.load(args.config or EMBEDDED, args.overrides)
            if args.command in QUIET:
                from spin_ray.stages.loop import check_inputs

                check_inputs(cfg, args.command)  # bad storage, data or model: one paragraph before Ray starts
                if not args.verbose:
                    log_path = log_file_for(cfg.storage, args.command)
                    quiet_output(log_path)
                ray_cluster.start(cfg, cfg.storage, log_path)
                if log_path is not None:
                    say(f"spin-ray {args.command}: full log in {log_path} (--verbose shows it here)")
            out = COMMANDS[args.command](cfg, args)
    except (ConfigError, FileNotFoundError) as e:
        ray_cluster.stop_watching()
        if args.debug:
            _back_to_terminal()  # the traceback Python prints next belongs on the terminal
            raise
        complain(f"spin-ray {args.command}: error: {e}")
        return 2
    except Exception as e:
        if ray_cluster.stop_watching() and ray_cluster.gone():  # the error Ray raised is only the symptom
            complain(ray_cluster.lost_text())
            log.exception("spin-ray %s failed: the Ray cluster went away", args.command)
            return 1
        if args.debug or log_path is None:
            _back_to_terminal()
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
        _logs_only()
    if args.command == "run":
        out["total_seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(out, indent=2, default=str), file=_console or sys.stdout, flush=True)
    else:
        say(*SCREENS[args.command](out))
    return 1 if out.get("fits") is False else 0  # `plan`: the cluster cannot hold the run


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain, or in the text of a worker's error (Ray re-raises it as another type)."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _back_to_terminal() -> None:
    """Point sys.stdout/stderr at the terminal again."""
    if _console is None:
        return
    _logs_only()
    sys.stdout, sys.stderr = _console, _console_err


class _LogSink:
    """A stream into the log file that drops what a full disk refuses instead of raising."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _logs_only() -> None:
    """After the command: what Ray's log monitor still prints of the workers' output (it lags the error the driver
    saw) keeps going to the log file, never after the result on the terminal; and a log file on a full disk must
    not turn the exit into an error of its own when Python flushes it at shutdown."""
    if _console is None or isinstance(sys.stdout, _LogSink):
        return
    sys.stdout, sys.stderr = _LogSink(sys.stdout), _LogSink(sys.stderr)

