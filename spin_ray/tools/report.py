"""`spin-ray report STORAGE`: did each iteration help, and which model to keep? A table and plots from a run's records.

Reads only what the stages wrote (manifest.json, base/eval.json, iter_<t>/eval.json, iter_<t>/train_metrics.jsonl),
so it works on a finished, stopped or still-running run, and on object storage.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

from spin_ray.data import records
from spin_ray.data.layout import RunLayout

COLUMNS = ("model", "task score", "NLL/token", "reward acc", "reward margin", "answer tokens", "hit max_tokens",
           "pairs s", "train s", "eval s")


def collect(storage: str) -> dict[str, Any]:
    """Per model θ_0, θ_1, …: its evaluation and the seconds of the iteration that made it; per iteration: its steps."""
    layout = RunLayout(storage)
    manifest = records.read_json(layout.manifest) if records.exists(layout.manifest) else {}
    stages = manifest.get("stages", {})
    iterations = layout.iterations()
    models, steps = [], {}
    for k in range(len(iterations) + 1):
        evaluation = layout.evaluation(k)
        seconds = stages.get(f"iter_{k - 1}", {}).get("seconds", {}) if k else {}
        if evaluation is None and not (k and layout.done(layout.model(k - 1))):
            continue
        models.append({"theta": k, "evaluation": evaluation, "seconds": seconds})
    for t in iterations:
        steps[t] = [json.loads(line) for line in records.read_lines(layout.train_metrics(t))]
    return {"models": models, "steps": steps, "selected": manifest.get("selected")}


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def table(data: dict[str, Any]) -> list[str]:
    """Markdown rows, one per model."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    kept = data.get("selected")
    for m in data["models"]:
        e, sec = m["evaluation"] or {}, m["seconds"]
        name = "θ_0 (start)" if m["theta"] == 0 else f"θ_{m['theta']} (iter_{m['theta'] - 1})"
        if kept and kept["theta"] == m["theta"]:
            name += f" **kept** ({kept['rule']})"
        rows.append("| " + " | ".join([
            name, _fmt(e.get("task_score")), _fmt(e.get("nll_per_token")), _fmt(e.get("reward_accuracy")),
            _fmt(e.get("reward_margin")), _fmt(e.get("answer_tokens"), ".1f"), _fmt(e.get("truncated_share"), ".0%"),
            _fmt(sec.get("pairs"), ".1f"), _fmt(sec.get("train"), ".1f"), _fmt(sec.get("eval"), ".1f"),
        ]) + " |")
    return rows


def _by_kind(data: dict[str, Any]) -> list[str]:
    kinds = sorted({k for m in data["models"] for k in ((m["evaluation"] or {}).get("task_score_by_kind") or {})})
    if not kinds:
        return []
    rows = ["| model | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for m in data["models"]:
        by = (m["evaluation"] or {}).get("task_score_by_kind") or {}
        rows.append(f"| θ_{m['theta']} | " + " | ".join(_fmt(by.get(k)) for k in kinds) + " |")
    return rows


def lm_eval_columns(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(configured task, result row, metric) of every lm-eval score any model has, stderr left out, in first-seen
    order."""
    seen: dict[tuple[str, str, str], None] = {}
    for m in data["models"]:
        for task, entry in ((m["evaluation"] or {}).get("lm_eval") or {}).items():
            for row, metrics in entry["scores"].items():
                for metric in metrics:
                    if not metric.endswith("_stderr"):
                        seen[(task, row, metric)] = None
    return list(seen)


def _lm_eval_value(m: dict[str, Any], column: tuple[str, str, str]) -> float | None:
    task, row, metric = column
    entry = ((m["evaluation"] or {}).get("lm_eval") or {}).get(task) or {}
    return (entry.get("scores") or {}).get(row, {}).get(metric)


def _lm_eval_table(data: dict[str, Any]) -> list[str]:
    columns = lm_eval_columns(data)
    if not columns:
        return []
    rows = ["| model | " + " | ".join(f"{row} {metric}" for _, row, metric in columns) + " |",
            "|" + "---|" * (len(columns) + 1)]
    for m in data["models"]:
        rows.append(f"| θ_{m['theta']} | " + " | ".join(_fmt(_lm_eval_value(m, c)) for c in columns) + " |")
    return rows


def _plot(data: dict[str, Any]) -> tuple[bytes, bytes]:
    """PNG bytes: training loss and reward margin over steps coloured by iteration; evaluation by model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = 0
    for t, steps in sorted(data["steps"].items()):
        x = [offset + s["step"] for s in steps]
        axes[0].plot(x, [s["loss"] for s in steps], marker=".", label=f"iteration {t}")
        axes[1].plot(x, [s["rewards/margins"] for s in steps], marker=".", label=f"iteration {t}")
        offset += max((s["step"] for s in steps), default=0)
    for ax, title in zip(axes, ("SPIN loss (training pairs)", "reward margin (training pairs)")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step (all iterations)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    training = _png(fig, plt)

    models = [m for m in data["models"] if m["evaluation"]]
    panels = [("task_score", "held-out task score"), ("nll_per_token", "held-out NLL/token of human answers"),
              ("reward_accuracy", "held-out reward accuracy vs previous θ")]
    # Scores on a 0..1 scale (accuracies, exact match) share one panel; perplexities and the like stay in the table.
    columns = [c for c in lm_eval_columns(data) if all(0 <= (_lm_eval_value(m, c) or 0) <= 1 for m in models)]
    fig, axes = plt.subplots(1, 3 + bool(columns), figsize=(12 + 4 * bool(columns), 3.6))
    if columns:
        for column in columns:
            points = [(m["theta"], v) for m in models if (v := _lm_eval_value(m, column)) is not None]
            axes[3].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=" ".join(column[1:]))
        axes[3].set_title("lm-eval", fontsize=10)
        axes[3].set_xlabel("θ_k (k = iterations of SPIN)")
        axes[3].set_xticks([m["theta"] for m in models])
        axes[3].legend(fontsize=7)
    for ax, (key, title) in zip(axes, panels):
        points = [(m["theta"], m["evaluation"][key]) for m in models if m["evaluation"].get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        if key == "reward_accuracy":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)  # the fixed point
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("θ_k (k = iterations of SPIN)")
        ax.set_xticks([m["theta"] for m in models])
    fig.tight_layout()
    return training, _png(fig, plt)


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(storage: str) -> str:
    """Write `<storage>/report.md`, `report_training.png` and `report_eval.png`; return the report's path."""
    data = collect(storage)
    layout = RunLayout(storage)
    root = layout.root
    if not data["models"]:
        raise FileNotFoundError(f"no evaluation or trained model under {root}: is it a spin-ray run's storage?")
    training, evaluation = _plot(data)
    records.write_bytes_atomic(layout.report_training, training)
    records.write_bytes_atomic(layout.report_eval, evaluation)
    split = next((m["evaluation"] for m in data["models"] if m["evaluation"]), {})
    lines = [f"# SPIN run report: {root}", "",
             f"Held-out evaluation on {split.get('rows', '?')} prompts of split {split.get('split', '?')!r} "
             "(never trained on). Task score: the model's greedy answers checked by the task's scorer. Reward acc: "
             "how often θ_k's implicit reward ranks the human answer above θ_{k−1}'s sampled answer (0.5 = the "
             "paper's fixed point). Seconds: the iteration that made the model.", "", *table(data), ""]
    if data["selected"]:
        kept = data["selected"]
        how = f"the best held-out {kept['by'].replace('_', ' ')}" if kept["by"] else f"loop.select = {kept['rule']}"
        lines += [f"Kept: θ_{kept['theta']} ({how}), {kept['model']}.", ""]
    kinds = _by_kind(data)
    if kinds:
        lines += ["Task score by kind:", "", *kinds, ""]
    harness = _lm_eval_table(data)
    if harness:
        lines += ["lm-eval (EleutherAI's harness, eval.lm_eval; settings in each eval.json):", "", *harness, ""]
    # Links relative to report.md, which lies beside the plots.
    lines += [f"![training]({posixpath.basename(layout.report_training)})", "",
              f"![evaluation]({posixpath.basename(layout.report_eval)})", ""]
    records.write_bytes_atomic(layout.report, "\n".join(lines).encode())
    return layout.report


def print_table(storage: str) -> list[str]:
    return table(collect(storage))
