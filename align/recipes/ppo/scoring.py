"""Every reward of an RL run, called as TRL calls them, and combined as TRL combines them.

    reward model (optional; TRL puts it first) + reward functions  ->  (B, F) rewards, NaN where a
    function returned None  ->  weighted nansum  ->  (B,) the reward each completion is trained on

A function gets `prompts`, `completions` (text for string prompts; [{"role": "assistant", ...}]
for conversational ones), `completion_ids` and every other column of the prompt rows by name
(reward/functions.py). Held-out evaluation scores with the functions only: a reward model is a
training signal, not a measure of the task.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from align.recipes.ppo.grpo_losses import weighted_rewards


def completions_for(rows: list[dict], texts: list[str]) -> list:
    """What reward functions receive as completions: text, or one assistant message for chat prompts."""
    return [[{"role": "assistant", "content": t}] if isinstance(r["prompt"], list) else t
            for r, t in zip(rows, texts, strict=True)]


def columns_of(rows: list[dict], skip: tuple[str, ...] = ("prompt",)) -> dict[str, list]:
    """Every column but the prompt, as TRL passes them: one list per column, in row order."""
    keys = [k for k in rows[0] if k not in skip] if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}


@dataclass
class RewardState:
    """What a reward function gets as `trainer_state`: the fields of TRL's TrainerState it is read for
    (a curriculum by step, say)."""

    global_step: int
    max_steps: int
    epoch: float


class Scorer:
    """The weighted rewards of a run: `score(rows, texts, completion_ids) -> (total (B,), parts (B, F))`.

    Reward functions also get TRL's `trainer_state`, `log_metric(name, value)` (averaged into the step's
    metrics) and `log_extra(column, values)` (a column of the completions table); `pop_logged()` hands
    what they logged to the step."""

    def __init__(self, funcs: list, weights: list[float] | None):
        from reward.functions import RewardFunctions

        self.functions = RewardFunctions(funcs, weights)
        self.names = list(self.functions.names)
        self.model = None
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.extra: dict[str, list] = defaultdict(list)

    def score(self, rows: list[dict], texts: list[str], completion_ids: list[list[int]],
              places: list[str] | None = None, state: RewardState | None = None):
        prompts = [r["prompt"] for r in rows]
        extras = {"trainer_state": state, "log_metric": self.log_metric, "log_extra": self.log_extra}
        per_func = self.functions.score(prompts, completions_for(rows, texts), completion_ids, columns_of(rows),
                                        places=places, extras=extras)
        return weighted_rewards(per_func, self.functions.weights), per_func

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.extra[column].extend(values)

    def pop_logged(self) -> tuple[dict[str, float], dict[str, list]]:
        """(each logged metric's mean, the extra columns) since the last call."""
        metrics = {k: sum(v) / len(v) for k, v in self.metrics.items() if v}
        extra = dict(self.extra)
        self.metrics.clear()
        self.extra.clear()
        return metrics, extra


def build_scorers(config, base, device, dtype, python_funcs: list | None = None) -> tuple[Scorer, Scorer | None]:
    """(the training scorer, the held-out scorer: reward functions only, None without any).

    `python_funcs`: functions given in Python (train_grpo(reward_funcs=...)); they replace the config's
    reward_funcs, as TRL's reward_funcs argument does."""
    funcs = list(python_funcs) if python_funcs is not None else list(config.reward_funcs)
    n_model = config.reward_model_name_or_path is not None
    weights = list(config.reward_weights) if config.reward_weights is not None else [1.0] * (len(funcs) + n_model)
    if len(weights) != len(funcs) + n_model:
        from align.core.errors import UserError

        raise UserError(f"reward_weights: {len(weights)} weights for {len(funcs) + n_model} rewards (the reward "
                        f"model first, then reward_funcs)")
    task = Scorer(funcs, weights[n_model:]) if funcs else None
    if not n_model:
        return Scorer(funcs, weights), task
    from reward.sources import load_reward_model

    model_fn = load_reward_model(config.reward_model_name_or_path, base, device, dtype)
    scorer = Scorer([model_fn, *funcs], weights)
    scorer.model = model_fn.model  # the RewardModel on the shared base, or the classifier
    return scorer, task


def group_reward_stats(per_func: torch.Tensor, names: list[str]) -> dict[str, float]:
    """TRL's rewards/<name>/mean and /std (NaN-aware: rows a function left unscored are skipped)."""
    out = {}
    for j, name in enumerate(names):
        col = per_func[:, j]
        seen = col[~torch.isnan(col)]
        out[f"rewards/{name}/mean"] = seen.mean().item() if len(seen) else float("nan")
        out[f"rewards/{name}/std"] = seen.std().item() if len(seen) > 1 else 0.0
    return out
