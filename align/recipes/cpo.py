"""CPO and SimPO where only a LoRA adapter learns: a preference loss on the policy alone, no reference.

    align cpo --config configs/cpo_tiny.yaml [--resume] [--set loss_type=simpo]

The loss is TRL's CPOTrainer's (trl/experimental/cpo, TRL 1.16):

    loss = mean cpo_loss(π_c, π_r) + cpo_alpha · NLL(chosen completions)

sigmoid and hinge read summed completion log-probs, ipo and simpo per-token averages; simpo shifts the
margin by simpo_gamma; `loss_type: alphapo` is simpo with cpo_alpha 0 (set `alpha` for AlphaPO's reward
shape). SimPO as its paper runs it: loss_type simpo, cpo_alpha 0 (configs/simpo_smollm2.yaml).
Losses: align/recipes/reference_free_losses.py; scoring and the adapter: align/recipes/reference_free.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.recipes.reference_free import PairScores, ReferenceFreeConfig, ReferenceFreeTrainer, reward_stats
from align.recipes.reference_free_losses import AVERAGED, CPO_LOSS_TYPES, cpo_loss
from align.train.cli import adapter_recipe
from align.train.config_parser import arg


@dataclass
class CPOConfig(ReferenceFreeConfig):
    """Everything a CPO/SimPO run depends on (TRL's CPOConfig names). YAML files under configs/ mirror these."""

    output_dir: str = arg("runs/cpo", "Run folder: adapter/, checkpoints/, metrics.jsonl, tb/.")
    loss_type: str | list[str] = arg("sigmoid", f"One of {CPO_LOSS_TYPES}, or alphapo (simpo with cpo_alpha 0).")
    beta: float = arg(0.1, "Temperature of the preference loss (IPO: its regularisation τ).")
    label_smoothing: float = arg(0.0, "Assumed label noise (sigmoid, simpo).")
    cpo_alpha: float = arg(1.0, "Weight of the chosen completions' NLL (CPO's behaviour-cloning term; 0 for "
                                "SimPO as its paper runs it).")
    simpo_gamma: float = arg(0.5, "SimPO's target reward margin (loss_type: simpo only).")
    alpha: float = arg(0.0, "AlphaPO's reward shape (1 - p^-alpha) / alpha for every loss type; 0: log-probs.")

    def __post_init__(self):
        if isinstance(self.loss_type, list) and len(self.loss_type) != 1:  # TRL's CPOConfig takes one loss type
            raise ValueError(f"loss_type: expected one of {CPO_LOSS_TYPES} or alphapo, got {self.loss_type}")
        if isinstance(self.loss_type, list):  # TRL's list form of one loss
            self.loss_type = self.loss_type[0]
        if self.loss_type == "alphapo":  # TRL's shorthand, resolved as TRL resolves it
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        super().__post_init__()
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {CPO_LOSS_TYPES} or alphapo, got {self.loss_type!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError(f"label_smoothing: only sigmoid and simpo use it, not {self.loss_type}")
        if self.cpo_alpha < 0:
            raise ValueError(f"cpo_alpha: expected >= 0, got {self.cpo_alpha}")


class CPOTrainer(ReferenceFreeTrainer):
    name = "cpo"

    def nll_over(self) -> str | None:
        return "completion" if self.config.cpo_alpha else None  # TRL skips it (and logs 0) at cpo_alpha 0

    def objective(self, scores: PairScores):
        c = self.config
        chosen, rejected = (scores.averages() if c.loss_type in AVERAGED
                            else (scores.chosen_sum, scores.rejected_sum))
        losses, r_c, r_r = cpo_loss(chosen, rejected, c.beta, c.loss_type, c.label_smoothing, c.simpo_gamma,
                                    c.alpha)
        loss = losses.mean()
        if scores.nll is not None:
            loss = loss + c.cpo_alpha * scores.nll
        stats = reward_stats(r_c, r_r, chosen, rejected)
        stats["nll_loss"] = scores.nll.item() if scores.nll is not None else 0.0
        return loss, stats


def train_cpo(config: CPOConfig, resume: bool | str | None = None, overwrite: bool = False,
              train_dataset=None, eval_dataset=None, resume_changed: bool = False):
    """Run CPO (or SimPO) end to end and return the saved adapter folder (datasets: a Dataset or a list of dicts)."""
    return CPOTrainer(config, resume=resume, overwrite=overwrite, train_dataset=train_dataset,
                      eval_dataset=eval_dataset, resume_changed=resume_changed).train()


# -- CLI ----------------------------------------------------------------------------------------
add_arguments, run = adapter_recipe(CPOConfig, CPOTrainer)
