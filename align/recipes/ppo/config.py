"""PPOConfig, GRPOConfig, RLOOConfig: every knob of `align ppo|grpo|rloo`, one field each.

Shared settings (model and LoRA, optimisation, run folder, logging) come from TrainConfig, and the
prompts, sampling, engine and reward functions from RolloutConfig (align/recipes/rollout_config.py), under
TRL's names. The RL fields are TRL 1.16's GRPOConfig/ScriptArguments names and defaults wherever
TRL has the idea (beta, epsilon, epsilon_high, num_iterations, loss_type, scale_rewards,
reward_funcs, vllm_server_base_url, ...), so a `trl grpo` YAML runs unchanged; PPO's critic keeps
TRL's PPOConfig names (cliprange_value, vf_coef, gamma, lam). Our own additions (prompts_per_step,
engine, system_prompt, kl_target, ...) say so in their help. docs/ppo.md maps the batch sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from align.recipes.ppo.config_checks import check_grpo_fields, check_ppo_fields
from align.recipes.rollout_config import RolloutConfig
from align.train.config import TrainConfig
from align.train.config_parser import arg

ALGORITHMS = ("ppo", "grpo", "rloo")


@dataclass
class PPOConfig(RolloutConfig):
    output_dir: str = arg("runs/ppo", "Run folder: metrics.jsonl, tb/, checkpoints/, final adapters.")
    max_steps: int = arg(-1, "Rollout steps (-1: num_train_epochs passes over the prompts). With TRL's defaults "
                             "(num_iterations 1, steps_per_generation = gradient_accumulation_steps) one rollout "
                             "step is one optimizer step, as TRL counts max_steps.")
    learning_rate: float = arg(1e-4, "Policy adapter learning rate (TRL's GRPO default, 1e-6, is for full "
                                     "fine-tuning; LoRA's best is ~10x full fine-tuning's: docs/design.md).")
    lr_scheduler_type: str = arg("constant", "transformers.get_scheduler name, over optimizer steps.")
    per_device_train_batch_size: int = arg(8, "Completions per forward/backward pass in the update (TRL's meaning).")
    padding_free: bool = arg(False, "Forward each micro-batch's prompt+completion sequences as one row without "
                                    "padding (TRL's SFT/DPO name); same per-token log-probs. Checked on the model "
                                    "before training.")

    # -- rollout (TRL's names) -------------------------------------------------------------------
    algorithm: str = arg("ppo", "'ppo' (critic + GAE), 'grpo' (group-normalised) or 'rloo' (leave-one-out); "
                                "`align grpo` and `align rloo` set it.")
    steps_per_generation: int | None = arg(None, "Micro-batches of per_device_train_batch_size completions one "
                                                 "rollout feeds (TRL's; null: gradient_accumulation_steps).")
    generation_batch_size: int | None = arg(None, "Completions per rollout over all processes (TRL's; instead of "
                                                  "steps_per_generation).")
    prompts_per_step: int | None = arg(None, "Ours: prompts per rollout; null: TRL's generation batch / "
                                             "num_generations.")
    max_completion_length: int = arg(512, "Completion length limit in tokens.")
    mask_truncated_completions: bool = arg(False, "Completions cut at max_completion_length take no part in the loss.")
    sampler_logprobs_as_old: bool | None = arg(None, "Ours: take pi_old, the ratio's denominator, from the sampler's "
        "log-probs instead of a trainer forward (one forward less per step). null: when no reference forward runs "
        "(beta 0) and an in-process engine samples in the training dtype, where the sync probe holds it to the "
        "trainer within 1e-4.")
    vllm_importance_sampling_correction: bool = arg(True, "Reweight the loss by pi_old / pi_sampler where the "
                                                          "sampler's log-probs differ from the trainer's (TRL's).")
    vllm_importance_sampling_mode: str = arg("sequence_mask", "token_truncate | token_mask | sequence_truncate | "
                                                              "sequence_mask (TRL's).")
    vllm_importance_sampling_clip_min: float | None = arg(None, "Lower bound of the correction ratio (mask modes).")
    vllm_importance_sampling_clip_max: float | None = arg(3.0, "Upper bound of the correction ratio.")

    # -- rewards (TRL's names) -------------------------------------------------------------------
    reward_model_name_or_path: str | None = arg(None, "A reward model: align's reward folder (an adapter on the "
                                                      "shared base), an exported classifier, or any "
                                                      "AutoModelForSequenceClassification folder or hub id.")
    log_completions: bool = arg(False, "Write a table of prompts, completions and rewards every logging step "
                                       "(completions.jsonl; trackers that take tables).")
    num_completions_to_print: int | None = arg(None, "With log_completions: rows printed per logging step "
                                                     "(null: all).")

    # -- the update (TRL's names) ----------------------------------------------------------------
    num_iterations: int = arg(1, "Passes over each rollout (TRL's mu).")
    epsilon: float = arg(0.2, "Lower clipping of the ratio: 1 - epsilon.")
    epsilon_high: float | None = arg(None, "Upper clipping: 1 + epsilon_high (DAPO's clip-higher; null: epsilon).")
    loss_type: str = arg("dapo", "grpo | bnpo | dr_grpo | dapo: how token losses are averaged (TRL's).")
    importance_sampling_level: str = arg("token", "token | sequence (GSPO): the ratio per token or per sequence.")
    scale_rewards: str = arg("group", "group | batch | none: divide advantages by the group's or batch's reward "
                                      "std, or not (Dr. GRPO).")
    critic_learning_rate: float | None = arg(None, "PPO: critic adapter + value head learning rate "
                                                   "(default: learning_rate).")
    cliprange_value: float | None = arg(0.2, "PPO: value clipping around the old values (null: squared error).")
    vf_coef: float = arg(0.5, "PPO: weight of the value loss.")
    entropy_coef: float = arg(0.0, "Entropy bonus weight (0: off).")
    gamma: float = arg(1.0, "PPO: discount per token (1.0: the final score counts fully for every token).")
    lam: float = arg(0.95, "PPO: GAE lambda; lower trusts the critic more.")
    whiten_advantages: bool | None = arg(None, "Normalise advantages over the batch; null: PPO yes, GRPO/RLOO no.")

    # -- KL to the reference -----------------------------------------------------------------------
    beta: float = arg(0.0, "KL coefficient (TRL's default 0: no reference forward at all).")
    use_bias_correction_kl: bool = arg(True, "GRPO's in-loss KL multiplied by the ratio: the unbiased reverse-KL "
                                             "gradient (TRL's, after DeepSeek-V3.2).")
    kl_estimator: str | None = arg(None, "Ours: 'k1' (log p - log q) or 'k3' (TRL's GRPO KL); null: k3 for GRPO, "
                                         "k1 for PPO/RLOO.")
    kl_in_reward: bool | None = arg(None, "Ours: subtract beta*KL from the rewards (PPO, RLOO) or add it to the "
                                          "loss (GRPO, TRL's); null: as the algorithm does in TRL.")
    kl_target: float | None = arg(None, "Ours: adaptive KL, steering beta towards this KL (null: fixed).")
    kl_horizon: int = arg(10000, "Adaptive KL controller horizon in sequences.")
    log_reference_kl: bool = arg(False, "With beta 0, still run the reference forward to log kl.")
    max_kl: float = arg(20.0, "Stop with TrainingDiverged when the mean KL to the reference exceeds this.")

    RENAMED = {**TrainConfig.RENAMED, "estimator": "algorithm", "epochs": "num_iterations",
               "num_ppo_epochs": "num_iterations", "kl_coef": "beta", "cliprange": "epsilon",
               "clip_eps": "epsilon", "prompts": "train_file", "eval_prompts": "eval_file",
               "reward_functions": "reward_funcs (a list of names; their weights go in reward_weights)",
               "reward_model": "reward_model_name_or_path", "reward_model_weight": "reward_weights (the reward "
               "model's weight comes first)", "engine_url": "vllm_server_base_url",
               "minibatch_size": "per_device_train_batch_size", "generations_per_prompt": "num_generations",
               "max_new_tokens": "max_completion_length", "max_prompt_tokens": "max_prompt_length",
               "value_clip": "cliprange_value", "critic_lr": "critic_learning_rate"}

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        check_ppo_fields(self)
        check_grpo_fields(self)

    # -- what the fields resolve to ----------------------------------------------------------------
    @property
    def critic(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def kl_in_loss(self) -> bool:
        return not self.kl_in_reward if self.kl_in_reward is not None else self.algorithm == "grpo"

    @property
    def kl_kind(self) -> str:
        return self.kl_estimator or ("k3" if self.algorithm == "grpo" else "k1")

    @property
    def whiten(self) -> bool:
        return self.whiten_advantages if self.whiten_advantages is not None else self.algorithm == "ppo"

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def micro_batches_per_rollout(self, world: int = 1) -> int:
        """TRL's steps_per_generation: micro-batches of per_device_train_batch_size one rollout feeds."""
        if self.generation_batch_size is not None:
            return self.generation_batch_size // (self.per_device_train_batch_size * world)
        return self.steps_per_generation or self.gradient_accumulation_steps

    def prompts_per_rollout(self, world: int = 1) -> int:
        """Prompts per rollout over all processes: prompts_per_step, or TRL's generation batch / G."""
        if self.prompts_per_step is not None:
            return self.prompts_per_step
        return self.per_device_train_batch_size * self.micro_batches_per_rollout(world) * world // self.num_generations

    def rollout_steps(self, num_prompts: int, world: int = 1) -> int:
        """max_steps, or num_train_epochs passes over `num_prompts` prompts."""
        if self.max_steps != -1:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * num_prompts / self.prompts_per_rollout(world)))

    def optimizer_steps_per_rollout(self, world: int = 1) -> int:
        """num_iterations passes over a process's completions, per_device_train_batch_size x
        gradient_accumulation_steps of them per optimizer step."""
        per_update = self.per_device_train_batch_size * self.gradient_accumulation_steps
        local = self.prompts_per_rollout(world) // world * self.num_generations
        return self.num_iterations * math.ceil(local / per_update)

    def describe_batches(self, world: int, steps: int) -> str:
        """One line: what a rollout step holds and how it is cut, in TRL's terms."""
        prompts = self.prompts_per_rollout(world)
        per_update = self.per_device_train_batch_size * self.gradient_accumulation_steps
        updates = self.optimizer_steps_per_rollout(world)
        return (f"{self.algorithm}: each step samples {prompts} prompts x {self.num_generations} generations = "
                f"{prompts * self.num_generations} completions on {world} process(es), then takes {updates} "
                f"optimizer step(s) of {per_update} completions per process ({self.num_iterations} pass(es)); "
                f"{steps} steps")


@dataclass
class GRPOConfig(PPOConfig):
    output_dir: str = arg("runs/grpo", "Run folder: metrics.jsonl, tb/, checkpoints/, the final policy adapter.")
    algorithm: str = arg("grpo", "'grpo' (group-normalised advantages); `align rloo` / `align ppo` for the others.")


@dataclass
class RLOOConfig(PPOConfig):
    output_dir: str = arg("runs/rloo", "Run folder: metrics.jsonl, tb/, checkpoints/, the final policy adapter.")
    algorithm: str = arg("rloo", "'rloo' (leave-one-out baseline); `align grpo` / `align ppo` for the others.")
