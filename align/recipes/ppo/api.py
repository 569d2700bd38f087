"""The Python face of the RL recipes, as TRL's trainers take their inputs:

    from align.recipes.ppo import GRPOConfig, train_grpo

    def correct(completions, solution, **kwargs):          # TRL's reward-function signature
        return [1.0 if c.strip() == s else 0.0 for c, s in zip(completions, solution)]

    policy = train_grpo(GRPOConfig(output_dir="runs/mine", max_steps=50),
                        train_dataset=Dataset.from_list(rows), reward_funcs=[correct])
"""

from __future__ import annotations

from pathlib import Path


def _train(config, algorithm: str, resume, overwrite, train_dataset, eval_dataset, reward_funcs,
           resume_changed: bool = False) -> Path:
    from align.core.errors import UserError
    from align.recipes.ppo.trainer import PPOTrainer

    if config.algorithm != algorithm:
        raise UserError(f"algorithm: this is train_{algorithm}, the config says {config.algorithm!r}")
    trainer = PPOTrainer(config, resume=resume, overwrite=overwrite, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, reward_funcs=reward_funcs, resume_changed=resume_changed)
    try:
        return trainer.train()
    finally:
        trainer.close()


def train_grpo(config, *, train_dataset=None, eval_dataset=None, reward_funcs: list | None = None,
               resume: bool | str | None = None, overwrite: bool = False, resume_changed: bool = False) -> Path:
    """Train with GRPO; returns the policy adapter's folder. `reward_funcs`: callables or dotted paths
    (replacing config.reward_funcs); `train_dataset` / `eval_dataset`: a datasets.Dataset or a list of
    rows with a "prompt" (replacing config.train_file / eval_file)."""
    return _train(config, "grpo", resume, overwrite, train_dataset, eval_dataset, reward_funcs, resume_changed)


def train_rloo(config, *, train_dataset=None, eval_dataset=None, reward_funcs: list | None = None,
               resume: bool | str | None = None, overwrite: bool = False, resume_changed: bool = False) -> Path:
    """As train_grpo, with RLOO's leave-one-out baseline."""
    return _train(config, "rloo", resume, overwrite, train_dataset, eval_dataset, reward_funcs, resume_changed)


def train_ppo(config, *, train_dataset=None, eval_dataset=None, reward_funcs: list | None = None,
              resume: bool | str | None = None, overwrite: bool = False, resume_changed: bool = False) -> Path:
    """As train_grpo, with PPO's critic (adapter + value head on the same base)."""
    return _train(config, "ppo", resume, overwrite, train_dataset, eval_dataset, reward_funcs, resume_changed)
