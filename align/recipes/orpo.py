"""ORPO where only a LoRA adapter learns: supervised NLL plus an odds-ratio preference term, no reference.

    align orpo --config configs/orpo_tiny.yaml [--resume] [--beta 0.2] [--set learning_rate=1e-4]

The loss is TRL's ORPOTrainer's (trl/experimental/orpo, TRL 1.16):

    loss = NLL(chosen prompt + completion) - β · mean log σ(log odds(chosen) - log odds(rejected))

with the odds from per-token AVERAGE completion log-probs (align/recipes/reference_free_losses.py).
The lifecycle is align.train.lifecycle's; scoring and the adapter are align/recipes/reference_free.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.recipes.reference_free import PairScores, ReferenceFreeConfig, ReferenceFreeTrainer, reward_stats
from align.recipes.reference_free_losses import orpo_loss
from align.train.cli import adapter_recipe
from align.train.config_parser import arg


@dataclass
class ORPOConfig(ReferenceFreeConfig):
    """Everything an ORPO run depends on (TRL's ORPOConfig names). YAML files under configs/ mirror these fields."""

    output_dir: str = arg("runs/orpo", "Run folder: adapter/, checkpoints/, metrics.jsonl, tb/.")
    beta: float = arg(0.1, "Weight of the odds-ratio term against the NLL (λ in the ORPO paper).")


class ORPOTrainer(ReferenceFreeTrainer):
    name = "orpo"
    nll = "sequence"  # TRL: "orpo chosen nll loss is computed over the full prompt and response"

    def objective(self, scores: PairScores):
        chosen, rejected = scores.averages()
        out = orpo_loss(chosen, rejected, self.config.beta)
        loss = scores.nll + out["ratio_loss"].mean()
        stats = reward_stats(out["chosen_rewards"], out["rejected_rewards"], chosen, rejected)
        stats.update({"nll_loss": scores.nll.item(), "log_odds_ratio": out["log_odds_ratio"].item(),
                      "log_odds_chosen": out["log_odds_chosen"].item()})
        return loss, stats


def train_orpo(config: ORPOConfig, resume: bool | str | None = None, overwrite: bool = False,
               train_dataset=None, eval_dataset=None, resume_changed: bool = False):
    """Run ORPO end to end and return the saved adapter folder (datasets: a Dataset or a list of dicts)."""
    return ORPOTrainer(config, resume=resume, overwrite=overwrite, train_dataset=train_dataset,
                       eval_dataset=eval_dataset, resume_changed=resume_changed).train()


# -- CLI ----------------------------------------------------------------------------------------
add_arguments, run = adapter_recipe(ORPOConfig, ORPOTrainer)
