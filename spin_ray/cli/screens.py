"""The last screen each command leaves on the terminal without --json: a few lines for a person."""

from __future__ import annotations

from typing import Any, Callable

# The phases of an iteration (IterationResult.seconds) in the order they run, as the last screen names them.
# `train` includes `reference` (θ_t's log-probs of the window's pairs, computed inside the fit).
PHASES = {"engines": "engine start", "pairs": "generation", "train": "training", "reference": "of which reference",
          "eval": "evaluation"}


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


def _prepared_line(what: str, out: dict[str, Any]) -> str:
    bad = sum(out["bad_rows"].values())
    done = "already there" if out["skipped"] else f"in {out['seconds']:.1f} s"
    return (f"{what}: {out['rows']} at {out['prompts']} ({done}; {out['duplicates']} duplicates dropped, {bad} bad "
            "rows skipped)")


# Per command, from its result. (plan and report print theirs while they run.)
SCREENS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "prepare": lambda out: [_prepared_line("prompts", out)] + ([_prepared_line("held-out prompts", out["eval"])]
                                                               if "eval" in out else []),
    "generate": lambda out: [f"pairs: {out['rows']} at {out['pairs']}" + (" (already there)" if out["skipped"] else
                                                                          f" in {out['seconds']['pairs']:.1f} s")],
    "train": lambda out: [f"model: {out['model']}" + (" (already there)" if out["skipped"] else
                                                      f", trained in {out['seconds']:.1f} s")],
    "run": _run_screen,
    "plan": lambda out: [],
    "report": lambda out: [f"report: {out['report']}"],
    "tiny-model": lambda out: [f"model: {out['model']}"],
    "serve": lambda out: [f"stopped serving {', '.join(out['served'])}"],
}
