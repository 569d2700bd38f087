"""The checks PPOConfig runs on itself: one line naming the field and what was expected, before any model loads.

Prompts, sampling, rewards and the engine are checked by the shared RolloutConfig (align/recipes/rollout_config.py).
"""

from __future__ import annotations

from align.recipes.rollout_config import positive_ints

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def check_ppo_fields(c) -> None:
    """Steps, batch shape and the PPO/KL knobs."""
    if c.num_train_epochs != 1 and c.max_steps != -1:
        raise ValueError("num_train_epochs: with max_steps set, the run takes max_steps rollout steps; "
                         "set one of them")
    if c.algorithm in ("grpo", "rloo") and c.num_generations < 2:
        raise ValueError(f"num_generations: {c.algorithm} compares completions of the same prompt; "
                         f"expected >= 2, got {c.num_generations}")
    positive_ints(c, "max_completion_length", "num_iterations", "prompts_per_step", "steps_per_generation",
                  "generation_batch_size")
    if c.steps_per_generation is not None and c.generation_batch_size is not None:
        raise ValueError("steps_per_generation and generation_batch_size: set one (TRL's rule)")
    if c.prompts_per_step is None:
        completions = c.per_device_train_batch_size * c.micro_batches_per_rollout()
        if c.generation_batch_size is not None and c.generation_batch_size % c.per_device_train_batch_size:
            raise ValueError(f"generation_batch_size: {c.generation_batch_size} is not a multiple of "
                             f"per_device_train_batch_size={c.per_device_train_batch_size}")
        if completions % c.num_generations:
            raise ValueError(f"num_generations: a rollout holds per_device_train_batch_size x steps_per_generation"
                             f" = {completions} completions, not a multiple of num_generations={c.num_generations}"
                             f" (TRL's rule); change one, or set prompts_per_step")
    if not 0 <= c.gamma <= 1 or not 0 <= c.lam <= 1:
        raise ValueError(f"gamma and lam: expected numbers in [0, 1], got {c.gamma}, {c.lam}")
    if c.kl_estimator not in (None, "k1", "k3"):
        raise ValueError(f"kl_estimator: expected 'k1', 'k3' or null, got {c.kl_estimator!r}")
    if c.beta < 0:
        raise ValueError(f"beta: expected >= 0, got {c.beta}")
    if c.kl_target is not None and c.kl_target <= 0:
        raise ValueError(f"kl_target: expected a positive number or null, got {c.kl_target}")
    if c.critic_learning_rate is not None and c.critic_learning_rate <= 0:
        raise ValueError(f"critic_learning_rate: expected > 0, got {c.critic_learning_rate}")


def check_grpo_fields(c) -> None:
    """TRL's loss family and its settings."""
    if c.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {list(LOSS_TYPES)}, got {c.loss_type!r}")
    if c.scale_rewards is True or c.scale_rewards is False:  # TRL's older boolean spelling
        c.scale_rewards = "group" if c.scale_rewards else "none"
    if c.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: expected one of {list(SCALE_REWARDS)}, got {c.scale_rewards!r}")
    if c.importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level: expected token or sequence, got {c.importance_sampling_level!r}")
    if c.vllm_importance_sampling_mode not in IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode: expected one of {list(IS_MODES)}, "
                         f"got {c.vllm_importance_sampling_mode!r}")
    if c.epsilon < 0 or (c.epsilon_high is not None and c.epsilon_high < 0):
        raise ValueError(f"epsilon and epsilon_high: expected >= 0, got {c.epsilon}, {c.epsilon_high}")
    if c.num_completions_to_print is not None and c.num_completions_to_print < 0:
        raise ValueError(f"num_completions_to_print: expected >= 0 or null, got {c.num_completions_to_print}")
