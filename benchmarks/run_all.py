"""Every benchmark, repeated, summarised in one file: `benchmarks/results/<YYYY-MM-DD>.md` (+ the JSONs it reads).

Each stage script compares spin_ray with a baseline measured in the same run (see its docstring); this runs every
script --repeats times, one at a time, the stages interleaved (rep 1 of every stage, then rep 2, ...) so that a burst
of other users' load does not land on one stage's repeats only, and reports per figure the median of the repeats with
its min-max spread. Ratios are formed inside each repeat (pipeline / its own baseline), then summarised.

    python benchmarks/run_all.py            # the full run (~40 min on 2 shared cores)
    python benchmarks/run_all.py --quick    # a smoke run of every stage (a few minutes), repeats 1, tiny sizes

Stages: generate (generate.py: pipeline vs direct vLLM, warm EnginePool), reference (reference.py: the trainer's
reference pass vs a direct transformers forward, and vs training), seeds (seeds.py: vLLM with a seed per request vs one
per batch, and which answers survive another batching), train (train.py: Ray Train vs a plain torch loop, precomputed vs in-memory reference), padding
(padding.py: padded vs padding-free micro-batches), iteration (iteration.py: the embedded default split by stage,
prompts x1, x2, x4). No GPU section: the GPU figures come from benchmarks/gpu_session.sh on a lent GPU (results/gpu/README.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import loadavg, machine  # noqa: E402

# Per stage: the script and its arguments, full and --quick. Sizes keep the full run inside ~40 minutes on 2 cores:
# the shipped tasks-sft model (what the embedded default runs) everywhere, short answers.
STAGES: dict[str, tuple[str, list[str], list[str]]] = {
    "iteration": ("iteration.py", ["--prompts", "32", "--repeats", "1", "--eval-rows", "32"],
                  ["--prompts", "16", "--scales", "1,4", "--repeats", "1", "--eval-rows", "16"]),
    "reference": ("reference.py", ["--pairs", "256", "--repeats", "1"], ["--pairs", "64", "--repeats", "1"]),
    "generate": ("generate.py",
                 ["--model", "tasks-sft", "--prompts", "256", "--max-tokens", "16", "--batch-size", "64",
                  "--max-length", "96", "--max-prompt-length", "64", "--actors", "1,2", "--pool", "1",
                  "--skip-pairs"],
                 ["--model", "tasks-sft", "--prompts", "64", "--max-tokens", "8", "--batch-size", "32",
                  "--max-length", "96", "--max-prompt-length", "64", "--actors", "1,2", "--pool", "1",
                  "--skip-pairs"]),
    "train": ("train.py",
              ["--model", "tasks-sft", "--pairs-count", "128", "--response-tokens", "16", "--micro-batch", "16",
               "--global-batch", "32", "--max-length", "96", "--max-prompt-length", "64", "--lr", "3e-4",
               "--workers", "1,2"],
              ["--model", "tasks-sft", "--pairs-count", "64", "--response-tokens", "8", "--micro-batch", "8",
               "--global-batch", "16", "--max-length", "96", "--max-prompt-length", "64", "--lr", "3e-4",
               "--workers", "1,2"]),
    "seeds": ("seeds.py", ["--prompts", "256", "--max-tokens", "32", "--repeats", "3"],
              ["--prompts", "32", "--max-tokens", "8", "--repeats", "1"]),
    "padding": ("padding.py", ["--layers", "1", "--vocab", "8192", "--steps", "3", "--global-batch", "32"],
                ["--layers", "1", "--vocab", "4096", "--steps", "2", "--global-batch", "16"]),
    # The same plans' padding shares from the lengths alone: exact (one run is enough), independent of the load.
    "padding-plan": ("padding.py", ["--vocab", "8192", "--steps", "3", "--global-batch", "32", "--plan-only"],
                     ["--vocab", "4096", "--steps", "2", "--global-batch", "16", "--plan-only"]),
}


def run_stage(name: str, quick: bool, out: str, log: str) -> float | None:
    """The stage's wall time, or None when it failed (its output is in `log`; the other stages still run)."""
    script, full, small = STAGES[name]
    cmd = [sys.executable, os.path.join(HERE, script), *(small if quick else full), "--out", out]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=os.path.dirname(HERE))
    if proc.returncode:
        print(f"    {script} failed (exit {proc.returncode}); its output is in {log}", flush=True)
        return None
    return time.perf_counter() - t0


# --- one repeat's JSON -> flat {figure: value}


def generate_figures(j: dict) -> dict[str, float]:
    d1, dd = j["direct"]["1"], j["direct"]["default"]
    f = {"direct omp=1 steady tok/s": d1["tok_s"], "direct default steady tok/s": dd["tok_s"],
         "direct peak RSS MiB": max(d1["peak_rss_mib"], dd["peak_rss_mib"]),
         "direct threads (default)": dd["torch_threads"]}
    one = None
    for p in j["pipeline"]:
        key = f"{p['actors']}x{p['cpus_per_actor']}"
        one = p if key == "1x1" else one
        f[f"pipeline {key} steady tok/s"] = p["steady_tok_s"]
        f[f"pipeline {key} / direct omp=1 (steady)"] = p["ratios"]["direct_omp_1"]["steady"]
        f[f"pipeline {key} / direct default (steady)"] = p["ratios"]["direct_omp_default"]["steady"]
        f[f"pipeline {key} / direct default (e2e)"] = p["ratios"]["direct_omp_default"]["e2e"]
        f[f"pipeline {key} peak RSS/actor MiB"] = max(a["peak_rss_mib"] or 0 for a in p["per_actor"])
        f[f"pipeline {key} threads/actor"] = max(a["torch_threads"] or 0 for a in p["per_actor"])
        f[f"pipeline {key} others' CPU"] = p["others_cpu_share"]
    two = next((p for p in j["pipeline"] if p["actors"] == 2 and p["cpus_per_actor"] == 1), None)
    if one and two:
        f["scaling: 2 actors / (2 x 1 actor), steady"] = two["steady_tok_s"] / (2 * one["steady_tok_s"])
    for w in j.get("warm_pool", []):
        key = f"warm pool {w['engines']}"
        f[f"{key} steady tok/s"] = w["steady_tok_s"]
        f[f"{key} / direct omp=1 (steady)"] = w["ratios"]["direct_omp_1"]["steady"]
        f[f"{key} / direct default (steady)"] = w["ratios"]["direct_omp_default"]["steady"]
        f[f"{key} materialize / direct omp=1 generate call"] = w["ratios"]["direct_omp_1"]["e2e_warm"]
        f[f"{key} engine start s"] = w["pool_start_s"]
        f[f"{key} reload s"] = w["reload_s"]
        f[f"{key} peak RSS/engine MiB"] = w["peak_rss_mib"] or 0
        if one:
            f[f"{key} steady / pipeline 1x1 steady"] = w["steady_tok_s"] / one["steady_tok_s"]
    f["others' CPU (max over rows)"] = max([d1["others_cpu_share"], dd["others_cpu_share"],
                                            *(p["others_cpu_share"] for p in j["pipeline"]),
                                            *(w["others_cpu_share"] for w in j.get("warm_pool", []))])
    return f


def reference_figures(j: dict) -> dict[str, float]:
    f = {}
    for threads, r in j["runs"].items():
        f[f"reference pass tok/s (threads={threads})"] = r["reference_tok_s"]
        f[f"direct forward tok/s (threads={threads})"] = r["direct_tok_s"]
        f[f"reference / direct speed (threads={threads})"] = r["reference_over_direct_speed"]
        f[f"reference / training seconds, same pairs (threads={threads})"] = r["reference_over_train_seconds"]
        f["max |logp - direct|"] = r["max_abs_logp_diff"]
    return f


def seeds_figures(j: dict) -> dict[str, float]:
    same = j["same_answers_one_call_vs_batches"]
    return {"per-request seeds tok/s": j["tokens_per_s"]["seeded"], "one seed per batch tok/s":
            j["tokens_per_s"]["unseeded"], "seeded / unseeded speed": j["seeded_over_unseeded"],
            "seeded answers equal across batchings (share)": same["seeded"] / same["of"],
            "unseeded answers equal across batchings (share)": same["unseeded"] / same["of"]}


def train_figures(j: dict) -> dict[str, float]:
    plain = {(p["name"].split(", ")[1], p["ref_model"]): p for p in j["plain"]}
    b1, bd = plain[("OMP_NUM_THREADS=1", False)], plain[("OMP_NUM_THREADS=default", False)]
    f = {"plain omp=1 tok/s": b1["tok_s"], "plain default tok/s": bd["tok_s"],
         "plain default threads": bd["threads"], "plain peak RSS MiB": b1["peak_rss_mib"]}
    ref = plain.get(("OMP_NUM_THREADS=1", True))
    if ref:
        f["in-memory ref: step time / precomputed"] = ref["s_per_step"] / b1["s_per_step"]
        f["in-memory ref: ref forward share of step"] = ref["ref_forward_s_per_step"] / ref["s_per_step"]
        f["in-memory ref: extra peak RSS MiB"] = ref["peak_rss_mib"] - b1["peak_rss_mib"]
    if j["pairs"].get("precompute_ref_logps_s"):
        f["precompute ref log-probs, once, s"] = j["pairs"]["precompute_ref_logps_s"]
    by = {}
    for r in j["ray_train"]:
        key = f"{r['workers']}x{r['cpus_per_worker']}"
        by[key] = r
        f[f"Ray Train {key} tok/s"] = r["tok_s"]
        f[f"Ray Train {key} / plain omp=1"] = r["tok_s"] / b1["tok_s"]
        f[f"Ray Train {key} / plain default"] = r["tok_s"] / bd["tok_s"]
        f[f"Ray Train {key} threads/worker"] = r["threads"]
        f[f"Ray Train {key} peak RSS/worker MiB"] = r["peak_rss_mib"] or 0
        f[f"Ray Train {key} fit() wall s"] = r["wall_s"]
        if "max_loss_diff_vs_plain" in r:
            f[f"Ray Train {key} max |loss - plain|"] = r["max_loss_diff_vs_plain"]
    if "1x1" in by and "2x1" in by:
        f["scaling: 2 workers / (2 x 1 worker)"] = by["2x1"]["tok_s"] / (2 * by["1x1"]["tok_s"])
    f["others' CPU (max over rows)"] = max(r["others_cpu_share"] for r in j["plain"] + j["ray_train"])
    return f


def padding_figures(j: dict) -> dict[str, float]:
    f = {}
    for data, runs in j["runs"].items():  # empty with --plan-only
        before = runs["before"]
        for variant, r in runs.items():
            f[f"{data}: {variant} padding share"] = r["padding_share"]
            f[f"{data}: {variant} real tok/s"] = r["real_tok_s"]
            if variant != "before":
                f[f"{data}: {variant} / before (real tok/s)"] = r["real_tok_s"] / before["real_tok_s"]
    for data, budgets in j.get("planned_padding", {}).items():
        for tokens, variants in budgets.items():
            for variant in ("before", "grouped", "packed-nocap", "packed"):
                f[f"{data}: {variant} padding share, planned at micro_batch_tokens={tokens}"] = variants[variant]
    if "others_cpu_share" in j:
        f["others' CPU"] = j["others_cpu_share"]
    return f


def iteration_figures(j: dict) -> dict[str, float]:
    from iteration import STAGES as PARTS

    f = {}
    runs = {r["prompts"]: r for r in j["runs"]}
    smallest, largest = min(runs), max(runs)
    for n, r in sorted(runs.items()):
        for t, it in enumerate(r["iterations"]):
            f[f"{n} prompts: iteration {t} s"] = it["total"]
            for part in PARTS:
                f[f"{n} prompts: iteration {t} {part} share"] = it[part] / it["total"]
        f[f"{n} prompts: wall s"] = r["wall_s"]
        f[f"{n} prompts: others' CPU"] = r["others_cpu_share"]
        for label, mib in r["peak_rss_mib"].items():
            key = f"peak RSS MiB: {process_kind(label)}"
            f[key] = max(f.get(key, 0.0), mib)

    def seconds(n: int, parts: tuple[str, ...]) -> float:  # both iterations
        return sum(it[p] for it in runs[n]["iterations"] for p in parts)

    sizes = sorted(runs)
    for part in ("generate", "reference", "train", "generate+reference+train"):
        parts = tuple(part.split("+"))
        for n in sizes:
            f[f"growth {part}: s/prompt at x{n // smallest}"] = seconds(n, parts) / n
        f[f"growth {part}: s/prompt at x{largest // smallest} / at x1"] = (
            (seconds(largest, parts) / largest) / (seconds(smallest, parts) / smallest))
        # Marginal cost per added prompt (fixed start-up costs cancel): flat when the work is linear in prompts.
        for a, b in zip(sizes, sizes[1:]):
            f[f"growth {part}: marginal s/prompt x{a // smallest}→x{b // smallest}"] = (
                (seconds(b, parts) - seconds(a, parts)) / (b - a))
    return f


def process_kind(label: str) -> str:
    """`ray::MapWorker(MapBatches(Generator)).__call__` -> `Generator (Ray Data stage)`, `ray::Generator.reload` ->
    `Generator (actor)`: one row per kind of process whatever it was doing when sampled."""
    name = label.split()[0].removeprefix("ray::")
    if name.startswith("MapWorker(MapBatches("):
        return name[len("MapWorker(MapBatches("):].split(")")[0] + " (Ray Data stage)"
    return name.split(".")[0] + " (actor)"


FIGURES = {"generate": generate_figures, "reference": reference_figures, "seeds": seeds_figures,
           "train": train_figures,
           "padding": padding_figures, "padding-plan": padding_figures, "iteration": iteration_figures}


def summarise(reps: list[dict[str, float]]) -> dict[str, dict]:
    keys = list(dict.fromkeys(k for r in reps for k in r))
    out = {}
    for k in keys:
        vals = [r[k] for r in reps if k in r and r[k] is not None]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
                      "values": vals}
    return out


def fmt(v: float, key: str) -> str:
    if "share" in key or "others' CPU" in key:
        return f"{v:.0%}" if abs(v) >= 0.01 or v == 0 else f"{v:.1%}"
    if "|" in key:
        return f"{v:.1e}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"


def table(summary: dict[str, dict], keys: list[str] | None = None) -> list[str]:
    lines = ["| figure | median | min–max | n |", "|---|---|---|---|"]
    for k in keys or list(summary):
        if k in summary:
            s = summary[k]
            lines.append(f"| {k} | {fmt(s['median'], k)} | {fmt(s['min'], k)}–{fmt(s['max'], k)} | {s['n']} |")
    return lines


# The figures the summary table at the top of the results file repeats (the full tables follow it).
KEY_FIGURES = [
    ("generate", lambda k: k.startswith("pipeline 1x1 /") or k.startswith("scaling")
     or (k.startswith("warm pool") and ("/" in k or "reload" in k))),
    ("reference", lambda k: "/" in k),
    ("train", lambda k: k.startswith("Ray Train 1x1 /") or k.startswith("scaling") or k.startswith("in-memory")),
    ("padding", lambda k: k.startswith("long-tailed") and ("share" in k or "/" in k)),
    ("padding-plan", lambda k: "=8192" in k),
    ("iteration", lambda k: "x4 / at x1" in k or "marginal" in k and "+" in k),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: every stage once, tiny sizes")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per stage (default 3; 1 with --quick)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ", ".join(STAGES))
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="names the results file")
    ap.add_argument("--resume", action="store_true",
                    help="keep the JSONs already in the results folder (a finished stage repeat is not run again)")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: summarise the JSONs already in the results folder (e.g. of an interrupted run)")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    name = args.date + ("-quick" if args.quick else "")
    json_dir = os.path.join(args.out_dir, name)
    os.makedirs(json_dir, exist_ok=True)

    load_start = loadavg()
    walls: dict[str, list[float | None]] = {s: [] for s in stages}
    figures: dict[str, list[dict]] = {s: [] for s in stages}
    for rep in range(repeats):
        for stage in stages:
            out = os.path.join(json_dir, f"{stage}_{rep}.json")
            if args.render_only and not os.path.exists(out):
                continue
            if not (args.resume or args.render_only) or not os.path.exists(out):
                if os.path.exists(out):
                    os.remove(out)
                print(f"[{time.strftime('%H:%M:%S')}] {stage}, repeat {rep + 1}/{repeats} ...", flush=True)
                wall = run_stage(stage, args.quick, out, os.path.join(json_dir, f"{stage}_{rep}.log"))
                walls[stage].append(wall)
                if wall is None:
                    continue
                print(f"    {wall:.0f} s", flush=True)
                with open(out + ".wall", "w") as f:
                    f.write(f"{wall}\n")
            elif os.path.exists(out + ".wall"):  # kept from an earlier invocation
                with open(out + ".wall") as f:
                    walls[stage].append(float(f.read()))
            with open(out) as f:
                figures[stage].append(FIGURES[stage](json.load(f)))
    total = sum(w for ws in walls.values() for w in ws if w is not None)  # kept repeats included
    summary = {s: summarise(figures[s]) for s in stages}
    with open(os.path.join(json_dir, "summary.json"), "w") as f:
        json.dump({"machine": machine(), "repeats": repeats, "quick": args.quick, "total_wall_s": total,
                   "stage_wall_s": walls, "load_avg": {"start": load_start, "end": loadavg()},
                   "args": {s: STAGES[s][2 if args.quick else 1] for s in stages}, "summary": summary}, f, indent=2)
    md = os.path.join(args.out_dir, f"{name}.md")
    with open(md, "w") as f:
        f.write(render(summary, walls, total, repeats, args.quick, name))
        notes = os.path.join(json_dir, "NOTES.md")  # a person's reading of the figures, kept across re-renders
        if os.path.exists(notes):
            with open(notes) as n:
                f.write("\n" + n.read())
    print(f"\n{total:.0f} s in all; results in {md} and {json_dir}/")


def render(summary: dict[str, dict], walls: dict[str, list[float | None]], total: float, repeats: int, quick: bool,
           name: str) -> str:
    m = machine()
    lines = [f"# Benchmarks, {name}", "",
             f"`python benchmarks/run_all.py{' --quick' if quick else ''}`: {m['cpus']} CPU cores, "
             f"{m['memory_gib']} GiB, no GPU; {repeats} repeat(s) of every stage requested, interleaved (the n column "
             f"says how many finished); {total / 60:.1f} min of stage runs (load average when written: {loadavg()}). "
             "Every figure: median of the repeats and "
             "min–max; ratios are formed inside each repeat against the baseline of the same run. \"others' CPU\": "
             "the share of the cores that processes outside the benchmark used meanwhile (the machine may be "
             "shared). Raw JSONs and logs: "
             f"`benchmarks/results/{name}/`; per-stage method: the docstring of each script.", "",
             "Stage wall times (s, per repeat; 'failed': see its log): " + "; ".join(
                 f"{s} {', '.join('failed' if w is None else f'{w:.0f}' for w in ws) or 'none timed'}"
                 for s, ws in walls.items()),
             ""]
    sections = {
        "generate": ("Generation: pipeline vs direct vLLM, and the warm-engine path",
                     "benchmarks/generate.py: tasks-sft (the embedded default's model), float32, eager. *steady* = "
                     "output tokens / (first batch start → last batch end) inside the actors; *e2e* includes actor "
                     "and engine start. *warm pool* = spin_ray.stages.generate.EnginePool (keep_warm, the embedded "
                     "default): engines started once, `reload` between iterations, batches forwarded by "
                     "PooledGenerator; its *materialize / direct generate call* compares a whole warm generation "
                     "(Ray Data included, no engine start) with the direct engine's generate call alone."),
        "reference": ("Reference log-probs: the trainer's reference pass vs a direct transformers forward",
                      "benchmarks/reference.py: tasks-sft, synthesized pairs, the same micro-batch size and threads "
                      "on both sides, one process; reference = Trainer.logps on flattened micro-batches (what every "
                      "Train worker runs before its first step); direct = padded forwards with full-vocabulary "
                      "log_softmax; training = train_step over the same pairs."),
        "train": ("Training: Ray Train vs a plain torch loop; precomputed vs in-memory reference",
                  "benchmarks/train.py: tasks-sft, synthesized pairs; tok/s of steps 2..N on both sides."),
        "padding": ("Padding-free batches",
                    "benchmarks/padding.py: one process, random Llama of SmolLM2 widths; *before* = random pairs "
                    "padded to the longest of 2B sequences, *grouped* = length grouping at the same pair count, "
                    "*packed* = spin_ray.train today (pairs packed in one row, length-grouped under "
                    "micro_batch_tokens, at most baselines.MAX_PADDING = 10% padding per forward), *packed-nocap* = the "
                    "same without that cap (the rule before this run). Targets on the long-tailed mix: padding "
                    "≤ 10%, real tok/s ≥ 1.5× before."),
        "padding-plan": ("Padding share of the same plans, from the lengths alone",
                         "benchmarks/padding.py --plan-only: the padding share each variant's micro-batches would "
                         "process, exact and load-free, at three micro_batch_tokens budgets (the default 2 x micro x "
                         "max_length, the smallest allowed 2 x max_length, and 4x the default)."),
        "iteration": ("One iteration of the embedded default, by stage; growth with prompts",
                      "benchmarks/iteration.py: `spin_ray.stages.loop.run` with cpu_default.yaml, loop.iterations=2, "
                      "loop.window=2 (so iteration 1's reference pass covers iteration 0's pairs too), "
                      "data.max_rows = N, 2N, 4N. Shares are of the iteration's wall time; train is the fit's wall "
                      "less its reference pass. Growth = seconds per prompt (both "
                      "iterations) at 4N over at N: flat is 1.0, below 1 means fixed start-up costs amortise."),
    }
    key_rows = []
    for stage, pattern in KEY_FIGURES:
        for k, v in summary.get(stage, {}).items():
            if pattern(k):
                key_rows.append((f"{stage}: {k}", v))
    if key_rows:
        lines += ["## Key figures", "", "| figure | median | min–max | n |", "|---|---|---|---|"]
        lines += [f"| {k} | {fmt(v['median'], k)} | {fmt(v['min'], k)}–{fmt(v['max'], k)} | {v['n']} |"
                  for k, v in key_rows]
        lines.append("")
    for stage, s in summary.items():
        title, method = sections[stage]
        lines += [f"## {title}", "", method, "", *(table(s) if s else ["No repeat finished: see the logs."]), ""]
    return "\n".join(lines + gpu_section())


def gpu_section() -> list[str]:
    """The figures of benchmarks/gpu.py runs stored in results/gpu/ (it runs where a GPU is, without Ray)."""
    import glob

    lines = ["## GPU", "", "`benchmarks/gpu.py` on a lent GPU (it needs no Ray or vLLM; run separately): the "
             "trainer's FSDP2 bf16 step and its reference pass, next to `spin-ray plan`. Details: `results/gpu/README.md`. "
             "Published anchors: FSDP 7B about 55% MFU (PyTorch's FSDP blog, KempnerForge); vLLM 5–12k output "
             "tok/s for 8B on one H100 (vLLM not measured on a GPU here).", ""]
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(HERE, "results", "gpu", "*.json")))]
    runs = [r for r in runs if r.get("summary")]
    if not runs:
        return lines + ["No GPU run stored.", ""]
    lines += ["| device | model | micro-batches | real tok/s median (min–max) | MFU | peak GB | n |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        for variant, v in r["summary"].items():
            lines.append(f"| {r['env']['device']} | {r['model']['arch']} ({r['model']['params'] / 1e9:.2f}B) | "
                         f"{variant} | {v['real_tok_s_median']:.0f} ({v['min']:.0f}–{v['max']:.0f}) | "
                         f"{v['mfu_median']:.1%} | {v['peak_allocated_gb']:.1f} | {len(r['train'][variant])} |")
    return lines + [""]


if __name__ == "__main__":
    main()
