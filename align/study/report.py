"""What `align study` writes to its output folder: report.md (the rule before the numbers) and result.json.

result.json: {"study", "claim", "verdict", "reason", "seeds", "noise", "figures", "plan", "runs", "model",
"minutes", "elapsed_s", "plots"}; `figures` are the numbers the rule read, `noise` the seed spread it used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from align.core.atomic import atomic_write_text
from align.study.plan import Plan
from align.study.runner import Outcome, Study
from align.study.runs import Context
from align.study.verdict import rule_text


def _plain(value):
    """JSON-safe: nan becomes null, keys become text."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def result(study: Study, ctx: Context, plan: Plan, outcome: Outcome, minutes: float, elapsed_s: float) -> dict:
    v = outcome.verdict
    runs = {key: {k: r[k] for k in r if k not in ("curve", "step_seconds")} for key, r in ctx.results.items()}
    return _plain({"study": study.name, "claim": study.claim, "verdict": v.verdict, "reason": v.figures.get("reason"),
                   "seeds": list(ctx.seeds), "noise": v.noise, "figures": v.figures,
                   "plan": {"steps_per_run": plan.units, "runs": len(plan.runs), "lines": plan.lines()},
                   "runs": runs, "model": ctx.model, "minutes": minutes, "elapsed_s": elapsed_s,
                   "plots": [p.name for p in outcome.plots]})


def markdown(study: Study, data: dict, outcome: Outcome) -> str:
    v = outcome.verdict
    figures = {k: val for k, val in data["figures"].items() if k != "reason"}
    noise = "none (fewer than 2 seeds)" if data["noise"] is None else f"{data['noise']:.4f}"
    parts = [f"# align study {study.name}", "", f"Claim: {study.claim}", "",
             "## Rule (fixed before the runs)", "", "```", rule_text(study.name), "```", "",
             "## Setup", "", *[f"- {line}" for line in outcome.setup], "",
             "## Plan (calibration)", "", *[f"- {line}" for line in data["plan"]["lines"]], "",
             "## Results", "", *[t + "\n" for t in outcome.tables],
             f"Noise (seed spread: the largest range over seeds of any condition): {noise}", "",
             f"Figures the rule read: `{json.dumps(figures)}`", "",
             f"## Verdict: {v.verdict}", "", f"{data['reason']}.", "",
             *[f"- {note}" for note in outcome.notes], "" if outcome.notes else None,
             *[f"![{p.stem}]({p.name})" for p in outcome.plots], "",
             f"Seeds {data['seeds']}; {data['elapsed_s'] / 60:.1f} min of a {data['minutes']:g} min budget; model "
             f"`{data['model']}`. Per-run figures: result.json; runs/: each run's config.yaml and metrics.jsonl."]
    return "\n".join(p for p in parts if p is not None) + "\n"


def write(study: Study, ctx: Context, plan: Plan, outcome: Outcome, minutes: float, elapsed_s: float) -> Path:
    data = result(study, ctx, plan, outcome, minutes, elapsed_s)
    atomic_write_text(ctx.out / "result.json", json.dumps(data, indent=2))
    atomic_write_text(ctx.out / "report.md", markdown(study, data, outcome))
    return ctx.out / "report.md"
