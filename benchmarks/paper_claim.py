"""Does SPIN beat more SFT? The SPIN paper's Table 1 and its "more SFT" ablation, on the bundled checkable tasks.

    python benchmarks/paper_claim.py [--quick] [--seeds 0 1 2] [--sft-weight W] [--heldout validation] --out DIR

--sft-weight sets SPIN's train.sft_weight (the human answer's NLL added to the loss); --heldout validation evaluates
every model on the validation slice of train instead of `test`, which is where such a value is chosen.

Once (--sft-seed), a small char-level Llama is SFT'd offline (spin_ray.models.builders.sft) on the first 2600 bundled train
prompts (rows 2600-2999 of train are the validation slice the step counts were chosen on), giving two starting points:
  (a) weak: stopped early at a constant lr (under-trained; more SFT is the easy win there);
  (b) plateau: (a) trained on with the lr decayed to 0, to where more SFT no longer improves the held-out score (the
      paper's regime; the table's more-SFT rows show it for the test split too).
From each θ_0: SPIN iterations 0..T−1 through spin_ray's own loop (`spin_ray.stages.loop.run`: Ray Data + vLLM CPU engines,
Ray Train), and "more SFT": the same SFT function continued from θ_0 on the same prompts' human answers, one segment per
SPIN iteration with that iteration's optimizer steps, batch, optimizer, peak lr and schedule (only the loss differs).
Every model is measured by `spin_ray.stages.evaluate.evaluate` on the held-out `test` prompts (never trained on): task score
(exact match of greedy answers), NLL per token of the human answers, and the reward accuracy against the model before.
Hyperparameters are the small-model values that worked on these tasks before (β 1, AdamW lr 1e-4, sampled y' at
temperature 1; the paper's β 0.1 made the model worse here), not chosen on the test split.

Writes DIR/results.md, DIR/results.json, DIR/task_score.png (rewritten after every finished run) and the runs under
DIR/runs/. Finished runs there are reused, so an interrupted benchmark continues where it stopped; --report-only
rewrites the report from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# RAY_worker_niceness=0: at Ray's default (15) the actors and Train workers starve behind other users' jobs on a
# shared machine while the in-process SFT runs at 0 (benchmarks/README.md).
ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "RAY_worker_niceness": "0"}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)

REGIMES = ("weak", "plateau")
REGIME_TITLES = {"weak": "(a) weak SFT: under-trained, stopped at a constant lr",
                 "plateau": "(b) plateaued SFT: the lr decayed to 0, more SFT no longer helps (the paper's regime)"}
KINDS = ("add", "count", "reverse", "sort")


@dataclass(frozen=True)
class Sizes:
    sft_rows: int
    """Bundled train prompts SFT'd on (the first N); the SPIN prompts are the first `spin_prompts` of them."""
    weak_steps: int
    """SFT steps of (a): warmup, then the constant peak lr."""
    plateau_steps: int
    """Further SFT steps from (a) to (b), the lr decaying linearly to 0."""
    sft_lr: float
    spin_prompts: int
    eval_rows: int
    iterations: int
    epochs: int
    lr: float = 1e-4
    beta: float = 1.0
    batch: int = 32


FULL = Sizes(sft_rows=2600, weak_steps=100, plateau_steps=300, sft_lr=2e-3, spin_prompts=512, eval_rows=200,
             iterations=3, epochs=2)
# A smoke test of every code path, sized for CI: one seed, regime (b) only (the same code as (a)), one iteration
# (the loop's own tests cover iterations after the first).
QUICK = Sizes(sft_rows=2600, weak_steps=20, plateau_steps=20, sft_lr=2e-3, spin_prompts=64, eval_rows=40,
              iterations=1, epochs=1)


def spin_config(sizes: Sizes, model: str, storage: Path, seed: int, sft_weight: float = 0.0,
                heldout: Path | None = None) -> "SpinConfig":
    """The embedded CPU default with this benchmark's sizes and the small-model β and lr (module docstring);
    `heldout`: a data file from `validation_data` (models evaluated on the validation slice, not on `test`)."""
    import spin_ray
    from spin_ray.config import SpinConfig

    default = Path(spin_ray.__file__).parent / "assets" / "cpu_default.yaml"
    where = ([] if heldout is None else
             [f"data.path={heldout}", "eval.split=validation", "eval.scorer=paper_claim:task_score"])
    return SpinConfig.load(default, [
        f"model={model}", f"storage={storage}", f"seed={seed}", f"data.max_rows={sizes.spin_prompts}",
        f"train.lr={sizes.lr}", f"train.beta={sizes.beta}", f"train.epochs={sizes.epochs}",
        f"train.global_batch_size={sizes.batch}", f"train.micro_batch_size={sizes.batch}",
        f"train.sft_weight={sft_weight}", f"loop.iterations={sizes.iterations}", "loop.window=1",
        f"eval.rows={sizes.eval_rows}", "generate.temperature=1.0", "generate.keep_warm=true", *where])


VALIDATION = 2600
"""Bundled train rows from here on are the validation slice: never SFT'd or SPIN'd on (FULL.sft_rows)."""


def validation_data(sizes: Sizes, out: Path) -> Path:
    """The SPIN prompts (split `train`) and the validation slice (split `validation`) as one chat jsonl, so that a
    run can be evaluated on the slice that choices are made on instead of `test`."""
    path = out / "validation_data.jsonl"
    rows = train_rows(VALIDATION + sizes.eval_rows)
    chosen = [(r, "train") for r in rows[:sizes.spin_prompts]] + [(r, "validation") for r in rows[VALIDATION:]]
    path.write_text("".join(json.dumps({"messages": [*r["prompt"], {"role": "assistant", "content": r["real"]}],
                                        "split": split}) + "\n" for r, split in chosen))
    return path


def task_score(prompt: list[dict[str, str]], reference: str, answer: str) -> float:
    """eval.scorer for the validation data: the bundled tasks' own checker (what eval.scorer auto uses on them)."""
    from spin_ray.assets.make_tasks import check_answer

    return float(check_answer(prompt[-1]["content"], answer))


def train_rows(n: int) -> list[dict[str, Any]]:
    from spin_ray.config import DataConfig
    from spin_ray.data.sources import load_sft

    return load_sft(DataConfig(path="bundled", split="train", max_rows=n)).rows


def build_sft_models(sizes: Sizes, seed: int, out: Path) -> dict[str, Any]:
    """θ_0 of both regimes: (a), then (b) continued from (a) with the lr decayed to 0. Built models are reused."""
    from spin_ray.models.builders import sft

    done = out / "sft.json"
    if done.is_file():
        return json.loads(done.read_text())
    rows = train_rows(sizes.sft_rows)
    info: dict[str, Any] = {}
    start = time.perf_counter()
    weak = sft(rows, steps=sizes.weak_steps, lr=sizes.sft_lr, decay=False, seed=seed)
    weak.save(out / "weak")
    info["weak"] = {"path": str(out / "weak"), "steps": sizes.weak_steps, "final_loss": _tail(weak.losses),
                    "seed": seed, "seconds": time.perf_counter() - start}
    start = time.perf_counter()
    plateau = sft(rows, steps=sizes.plateau_steps, lr=sizes.sft_lr, warmup=0, decay=True, seed=seed + 1000,
                  start=out / "weak")
    plateau.save(out / "plateau")
    info["plateau"] = {"path": str(out / "plateau"), "steps": sizes.weak_steps + sizes.plateau_steps,
                       "final_loss": _tail(plateau.losses), "seed": seed, "seconds": time.perf_counter() - start}
    done.write_text(json.dumps(info, indent=1))
    return info


def _tail(losses: list[float], n: int = 10) -> float:
    return sum(losses[-n:]) / len(losses[-n:])


def same_answers_share(pairs_dir: str) -> float:
    """Share of pairs whose sampled y' equals the human y: those give the SPIN loss no gradient."""
    import pyarrow.parquet as pq

    table = pq.read_table(pairs_dir, columns=["real", "generated"])
    real, gen = table.column("real").to_pylist(), table.column("generated").to_pylist()
    return sum(r.strip() == g.strip() for r, g in zip(real, gen)) / max(1, len(real))


def run_spin(cfg: "SpinConfig") -> list[dict[str, Any]]:
    """SPIN iterations 0..T−1 through spin_ray's loop; θ_0's evaluation first, then θ_1..θ_T's."""
    from spin_ray.data.layout import RunLayout
    from spin_ray.stages.loop import run

    results = run(cfg)
    rows = [_row(RunLayout(cfg.storage).evaluation(0), steps=0, seconds=None)]
    for r in results:
        rows.append(_row(r.evaluation, steps=int(r.metrics["total_steps"]), seconds=r.seconds,
                         same_share=same_answers_share(r.pairs.path), train_loss=r.metrics.get("loss"),
                         train_reward_accuracy=r.metrics.get("rewards/accuracies")))
    return rows


def run_more_sft(cfg: "SpinConfig", sizes: Sizes, spin_rows: list[dict[str, Any]], seed: int,
                 pool: Callable[["SpinConfig"], Any], storage: Path) -> list[dict[str, Any]]:
    """More SFT from θ_0 on the SPIN prompts' human answers: segment t has SPIN iteration t's steps, batch, optimizer,
    peak lr and schedule (warmup then linear decay, restarted each iteration as spin_ray.train does)."""
    from spin_ray.data.layout import RunLayout
    from spin_ray.stages.evaluate import evaluate
    from spin_ray.models.builders import sft

    sft_cfg = dataclasses.replace(cfg, storage=str(storage))
    # θ_0 is the same model on the same prompts: its evaluation (and sampled answers, for the reward accuracy of
    # the next model) is copied, not recomputed.
    source, copy = RunLayout(cfg.storage), RunLayout(str(storage))
    Path(copy.eval_dir(0)).mkdir(parents=True, exist_ok=True)
    for name in ("eval_result", "eval_samples"):
        shutil.copy(getattr(source, name)(0), getattr(copy, name)(0))
    prompts = train_rows(sizes.spin_prompts)
    model, rows = cfg.model, []
    for t, spin_row in enumerate(spin_rows[1:]):
        steps = spin_row["steps"]
        start = time.perf_counter()
        result = sft(prompts, steps=steps, lr=sizes.lr, batch_size=sizes.batch,
                     warmup=math.ceil(cfg.train.warmup_ratio * steps), decay=True, seed=seed * 100 + t, start=model)
        model = str(storage / f"segment_{t}" / "model")
        result.save(model)
        train_s = time.perf_counter() - start
        engines = pool(cfg)
        engines.reload(model, t + 1)
        evaluation = evaluate(sft_cfg, model, t + 1, pool=engines)
        rows.append(_row(evaluation, steps=steps, seconds={"train": train_s}, train_loss=_tail(result.losses)))
    return rows


def _row(evaluation: dict[str, Any], **extra: Any) -> dict[str, Any]:
    keep = ("task_score", "task_score_by_kind", "nll_per_token", "reward_accuracy", "reward_margin", "answer_tokens",
            "truncated_share", "rows", "model")
    return {**{k: evaluation.get(k) for k in keep}, **extra}


# ---------------------------------------------------------------------------------------------------- reporting


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _fmt(s: dict[str, float] | None, digits: int = 3, pct: bool = False) -> str:
    if s is None:
        return "–"
    k = 100 if pct else 1
    d = 1 if pct else digits
    return f"{s['mean'] * k:.{d}f} ± {s['sd'] * k:.{d}f} [{s['min'] * k:.{d}f}, {s['max'] * k:.{d}f}]"


def summarize(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per regime and row (SFT, SPIN iter t, more SFT t): mean, sd, min, max over seeds."""
    out: dict[str, Any] = {}
    for regime, by_seed in runs.items():
        seeds = sorted(by_seed)
        n_iter = len(by_seed[seeds[0]]["spin"]) - 1
        table = []
        labels = [("SFT (θ_0)", "spin", 0)] + [(f"SPIN iter {t} (θ_{t + 1})", "spin", t + 1) for t in range(n_iter)]
        labels += [(f"more SFT (steps of SPIN iter ≤ {t})", "more_sft", t) for t in range(n_iter)]
        for label, key, i in labels:
            rows = [by_seed[s][key][i] for s in seeds]
            entry = {"row": label, "kind": key, "index": i,
                     "task_score": stats([r["task_score"] for r in rows]),
                     "nll_per_token": stats([r["nll_per_token"] for r in rows]),
                     "by_kind": {k: stats([r["task_score_by_kind"][k] for r in rows]) for k in KINDS
                                 if all(r["task_score_by_kind"] and k in r["task_score_by_kind"] for r in rows)},
                     "reward_accuracy": (stats([r["reward_accuracy"] for r in rows])
                                         if all(r["reward_accuracy"] is not None for r in rows) else None),
                     "steps_cumulative": sum(by_seed[seeds[0]][key][j]["steps"] for j in range(i + 1))}
            if key == "spin" and i > 0:
                entry["same_answer_share"] = stats([r["same_share"] for r in rows])
            table.append(entry)
        # Paired by seed: the same θ_0, the same steps, only the loss differs.
        diffs = [{"after_iter": t,
                  "spin_minus_more_sft_task_score": stats([by_seed[s]["spin"][t + 1]["task_score"]
                                                           - by_seed[s]["more_sft"][t]["task_score"] for s in seeds]),
                  "spin_minus_more_sft_nll": stats([by_seed[s]["spin"][t + 1]["nll_per_token"]
                                                    - by_seed[s]["more_sft"][t]["nll_per_token"] for s in seeds]),
                  "spin_minus_sft_task_score": stats([by_seed[s]["spin"][t + 1]["task_score"]
                                                      - by_seed[s]["spin"][0]["task_score"] for s in seeds]),
                  "more_sft_minus_sft_task_score": stats([by_seed[s]["more_sft"][t]["task_score"]
                                                          - by_seed[s]["spin"][0]["task_score"] for s in seeds])}
                 for t in range(n_iter)]
        out[regime] = {"seeds": seeds, "table": table, "paired": diffs}
    return out


def write_markdown(path: Path, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    sizes, n = meta["sizes"], meta["sizes"]["eval_rows"]
    noise = math.sqrt(0.25 / n)
    others = (("other processes' share of the cores not measured (that invocation was stopped)" if meta.get(
        "report_only") else "other processes' share of the cores is measured at the end")
              if meta["others_cpu_share"] is None
              else f"other processes used {meta['others_cpu_share']:.0%} of the cores meanwhile")
    wall = "?" if meta.get("wall_s") is None else f"{meta['wall_s'] / 60:.1f} min"
    load = "" if not meta.get("loadavg_before") else f" (load average {meta['loadavg_before'][0]:.1f} at the start)"
    if meta.get("report_only"):
        wall += " for the invocation that stored results.json (this report: assembled from the stored runs)"
    lines = [
        "# Does SPIN beat more SFT? (benchmarks/paper_claim.py)", "",
        f"Command: `{meta['command']}`; wall {wall}"
        f"{'' if meta['complete'] else ' so far (INCOMPLETE: written after each finished run)'} on {meta['machine']}, "
        f"shared: {others}{load}.", "",
        (f"Held-out: the first {n} `test` prompts of the bundled tasks (never trained on)." if meta.get("heldout", "test")
         == "test" else f"Held-out: the validation slice, bundled train rows {VALIDATION}..{VALIDATION + n - 1} (never "
         "trained on; where choices are made).") + " Task score = exact match of "
        f"greedy answers; one model's score on {n} prompts has a sampling sd of up to ±{noise:.3f} "
        f"(√(p(1−p)/{n}) at p = 0.5). Cells: mean ± sd [min, max] over the seeds of SPIN and more SFT "
        f"(sampling, batch order); θ_0 is one SFT model per regime (seed {meta['sft_seed']}), so its row has sd 0. "
        "NLL = per token of the "
        "human answers. Reward acc = the model's implicit reward β[log π_k − log π_{k−1}] ranks the human answer above "
        "the previous model's sampled answer (0.5 = the paper's fixed point).", "",
        f"θ_0: {sizes['sft_rows']} bundled train prompts, char-level Llama (0.9M parameters), AdamW, batch 32, peak lr "
        f"{sizes['sft_lr']}; (a) {sizes['weak_steps']} steps (10% warmup, then constant), (b) (a) + "
        f"{sizes['plateau_steps']} steps with the lr decayed linearly to 0. SPIN: spin_ray.stages.loop.run, "
        f"{sizes['spin_prompts']} prompts per iteration (the first of the SFT prompts), y' sampled at temperature 1, "
        f"β {sizes['beta']}, train.sft_weight {meta.get('sft_weight', 0.0):g}, AdamW lr {sizes['lr']} (10% warmup, "
        f"linear decay, per iteration), {sizes['epochs']} "
        f"epoch(s), batch {sizes['batch']} pairs, window 1. More SFT: the same prompts' human answers, one segment per "
        "SPIN iteration with its optimizer steps, batch, optimizer, peak lr and schedule (the steps column).", ""]
    for regime, s in summary.items():
        lines += [f"## {REGIME_TITLES[regime]}", "", f"Seeds {s['seeds']}.", "",
                  "| model | steps | task score (%) | add / count / reverse / sort (%) | NLL/token | reward acc | y' = y |",
                  "|---|---|---|---|---|---|---|"]
        for e in s["table"]:
            kinds = " / ".join(f"{e['by_kind'][k]['mean'] * 100:.0f}" if k in e["by_kind"] else "–" for k in KINDS)
            lines.append(f"| {e['row']} | {e['steps_cumulative']} | {_fmt(e['task_score'], pct=True)} | {kinds} | "
                         f"{_fmt(e['nll_per_token'])} | {_fmt(e['reward_accuracy'])} | "
                         f"{_fmt(e.get('same_answer_share'), 2)} |")
        lines += ["", "Paired by seed (same θ_0 and steps), in points of task score and NLL/token:", "",
                  "| after iteration | SPIN − more SFT (score) | SPIN − more SFT (NLL) | SPIN − SFT | more SFT − SFT |",
                  "|---|---|---|---|---|"]
        for d in s["paired"]:
            lines.append(f"| {d['after_iter']} | {_fmt(d['spin_minus_more_sft_task_score'], pct=True)} | "
                         f"{_fmt(d['spin_minus_more_sft_nll'])} | {_fmt(d['spin_minus_sft_task_score'], pct=True)} | "
                         f"{_fmt(d['more_sft_minus_sft_task_score'], pct=True)} |")
        lines.append("")
    lines += ["Per-phase seconds are in results.json (`timing`).", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, summary: dict[str, Any]) -> None:
    """Task score (top) and NLL (bottom) by iteration, SPIN against more SFT at the same optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(summary), figsize=(5.5 * len(summary), 7), squeeze=False)
    for col, (regime, s) in enumerate(summary.items()):
        table = s["table"]
        for ax, metric, scale, ylabel in ((axes[0][col], "task_score", 100, "held-out task score (%)"),
                                          (axes[1][col], "nll_per_token", 1, "held-out NLL/token")):
            for kind, label, colour in (("spin", "SPIN (spin_ray)", "tab:blue"), ("more_sft", "more SFT", "tab:orange")):
                points = [(0, table[0][metric])] + [(e["index"] + (1 if kind == "more_sft" else 0), e[metric])
                                                    for e in table if e["kind"] == kind
                                                    and (kind == "more_sft" or e["index"] > 0)]
                xs = [x for x, _ in points]
                ax.errorbar(xs, [p["mean"] * scale for _, p in points], yerr=[p["sd"] * scale for _, p in points],
                            label=label, color=colour, marker="o", capsize=3)
                ax.fill_between(xs, [p["min"] * scale for _, p in points], [p["max"] * scale for _, p in points],
                                color=colour, alpha=0.12)
            ax.set_ylabel(ylabel)
            ax.set_xticks(range(len(s["paired"]) + 1))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][col].set_title(f"{REGIME_TITLES[regime].split(':')[0]}, seeds {s['seeds']}", fontsize=10)
        axes[1][col].set_xlabel("iteration (0 = SFT; more SFT at the same optimizer steps)")
    fig.suptitle("mean ± sd over seeds (band: min–max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (results.md, results.json, task_score.png, runs/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of SPIN and more SFT (sampling, batch order); default 0 1 2 (--quick: 0)")
    parser.add_argument("--sft-seed", type=int, default=0,
                        help="seed of the SFT models, shared by all --seeds (one SFT build fits the time budget)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test (< 5 min idle): one seed, regime (b) only, two iterations, tiny sizes")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=None,
                        help="default both (--quick: plateau)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process SFT")
    parser.add_argument("--sft-weight", type=float, default=0.0, help="SPIN's train.sft_weight (0: the paper's loss)")
    parser.add_argument("--heldout", choices=["test", "validation"], default="test",
                        help="evaluate on the first eval_rows `test` prompts, or on the validation slice of train "
                             f"(rows {VALIDATION}..., never trained on: where choices such as --sft-weight are made)")
    parser.add_argument("--sft-dir", type=Path, default=None,
                        help="where the SFT models are built, or reused from (default OUT/runs/sft)")
    parser.add_argument("--report-only", action="store_true",
                        help="no training: rewrite results.md/json/png from the runs finished under --out")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    regimes = args.regimes or (["plateau"] if args.quick else list(REGIMES))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return report_only(out, args, sizes, seeds, regimes)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    # The in-process SFT runs on one thread: on a shared 2-core machine two OpenMP threads spin-wait for each other
    # and ran 3-4x slower per step than one (measured under load here).
    torch.set_num_threads(args.threads)

    import ray

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import RssSampler, loadavg
    from spin_ray.stages.generate import EnginePool

    wall = time.perf_counter()
    load_before = loadavg()
    timing: dict[str, Any] = {}
    runs: dict[str, dict[int, dict[str, Any]]] = {r: {} for r in regimes}
    meta = {"command": "python benchmarks/paper_claim.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "quick": args.quick, "seeds": seeds, "sft_seed": args.sft_seed, "regimes": regimes,
            "sft_weight": args.sft_weight, "heldout": args.heldout,
            "sizes": dataclasses.asdict(sizes), "machine": f"{os.cpu_count()} CPU cores", "loadavg_before": load_before,
            "loadavg_after": None, "timing": timing}
    warm: list[EnginePool] = []

    def pool(cfg: "SpinConfig") -> EnginePool:
        """One warm engine for every more-SFT evaluation of the run, loaded with each model in turn."""
        if not warm:
            warm.append(EnginePool(cfg.model, cfg.generate, iteration=0, seed=cfg.seed, max_length=cfg.data.max_length,
                                   max_prompt_length=cfg.data.max_prompt_length))
        return warm[0]

    # One local cluster for the whole benchmark; 6 logical CPUs on 2 cores so that the loop's engine, scorer and
    # Train worker (4) fit beside the warm engine that evaluates the more-SFT models.
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(ENV)})
    timing["ray_init"] = time.perf_counter() - wall
    load = RssSampler(lambda p: None, interval=2.0)
    try:
        with load:
            start = time.perf_counter()
            models = build_sft_models(sizes, args.sft_seed, args.sft_dir or out / "runs" / "sft")
            heldout = validation_data(sizes, out) if args.heldout == "validation" else None
            timing["sft"] = time.perf_counter() - start
            losses = ", ".join(f"{r} loss {m['final_loss']:.3f}" for r, m in models.items())
            print(f"[{time.perf_counter() - wall:6.0f} s] SFT models ({losses})", flush=True)
            # Regime (b) first: it is the claim that matters, and partial results are written after every run.
            for regime in sorted(regimes, key=lambda r: r != "plateau"):
                for seed in seeds:
                    where = out / "runs" / f"seed{seed}" / regime
                    done = where / "rows.json"
                    if done.is_file():  # finished in an earlier invocation with this --out
                        runs[regime][seed] = json.loads(done.read_text())
                        continue
                    cfg = spin_config(sizes, models[regime]["path"], where / "spin", seed, args.sft_weight, heldout)
                    start = time.perf_counter()
                    spin_rows = run_spin(cfg)
                    timing[f"seed{seed}/{regime}/spin"] = time.perf_counter() - start
                    start = time.perf_counter()
                    more = run_more_sft(cfg, sizes, spin_rows, seed, pool, where / "more_sft")
                    timing[f"seed{seed}/{regime}/more_sft"] = time.perf_counter() - start
                    runs[regime][seed] = {"sft": models[regime], "spin": spin_rows, "more_sft": more}
                    done.write_text(json.dumps(runs[regime][seed], indent=1, default=str))
                    spin_scores = " → ".join(f"{r['task_score']:.3f}" for r in spin_rows)
                    sft_scores = " → ".join(f"{r['task_score']:.3f}" for r in more)
                    print(f"[{time.perf_counter() - wall:6.0f} s] seed {seed} {regime}: SPIN {spin_scores}; "
                          f"more SFT {sft_scores}", flush=True)
                    report(out, runs, {**meta, "wall_s": time.perf_counter() - wall, "complete": False,
                                        "others_cpu_share": None})
    finally:
        for p in warm:
            p.shutdown()
        ray.shutdown()

    wall_s = time.perf_counter() - wall
    report(out, runs, {**meta, "wall_s": wall_s, "complete": True, "others_cpu_share": load.other_cpu_share,
                       "loadavg_after": loadavg()})
    print(f"wrote {out / 'results.md'}, results.json, task_score.png in {wall_s / 60:.1f} min", flush=True)
    return 0


def report_only(out: Path, args: argparse.Namespace, sizes: Sizes, seeds: list[int], regimes: list[str]) -> int:
    """The report of the runs finished under `out` (e.g. by several invocations), with the earlier run's metadata."""
    runs = {r: {s: json.loads((out / "runs" / f"seed{s}" / r / "rows.json").read_text()) for s in seeds
                if (out / "runs" / f"seed{s}" / r / "rows.json").is_file()} for r in regimes}
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    meta = {"command": earlier.get("command"), "quick": args.quick, "seeds": seeds, "sft_seed": args.sft_seed,
            "regimes": regimes, "sizes": dataclasses.asdict(sizes), "machine": f"{os.cpu_count()} CPU cores",
            "loadavg_before": earlier.get("loadavg_before"), "loadavg_after": earlier.get("loadavg_after"),
            "timing": earlier.get("timing", {}), "wall_s": earlier.get("wall_s"),
            "others_cpu_share": earlier.get("others_cpu_share"),
            "complete": all(len(by_seed) == len(seeds) for by_seed in runs.values()), "report_only": True}
    report(out, runs, meta)
    print(f"wrote {out / 'results.md'} from {sum(map(len, runs.values()))} finished runs", flush=True)
    return 0


def report(out: Path, runs: dict[str, dict[int, dict[str, Any]]], meta: dict[str, Any]) -> None:
    """results.json, results.md and the plot from the runs finished so far."""
    done = {regime: by_seed for regime, by_seed in runs.items() if by_seed}
    summary = summarize(dict(sorted(done.items(), key=lambda kv: REGIMES.index(kv[0]))))
    (out / "results.json").write_text(json.dumps({**meta, "summary": summary, "runs": runs}, indent=1, default=str))
    write_markdown(out / "results.md", summary, meta)
    plot(out / "task_score.png", summary)


if __name__ == "__main__":
    sys.exit(main())
