"""PPOConfig: every knob of `align ppo`, one field each, mirrored exactly by the YAML files in configs/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.model import LoraSettings

ESTIMATORS = ("ppo", "grpo", "rloo")


def _f(default, help: str, **kw):
    if isinstance(default, (dict, list)) or callable(default):
        factory = default if callable(default) else (lambda d=default: type(d)(d))
        return field(default_factory=factory, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class PPOConfig:
    # -- model ---------------------------------------------------------------------------------
    model: str = _f("smollm2", "'smollm2' (SmolLM2-135M-Instruct, built offline once) or a local model folder.")
    dtype: str = _f("float32", "Base weights dtype: float32 (CPU; vLLM log-probs match the trainer's) or bfloat16.")
    seed: int = _f(0, "Seed for prompts, sampling, minibatch order and head initialisation.")
    output_dir: str = _f("runs/ppo", "Run folder: metrics.jsonl, tb/, checkpoints/, final adapters.")
    lora: LoraSettings = _f(LoraSettings, "Policy and critic adapters. RL needs little capacity: rank 8 "
                                          "(4-8) with alpha 32 on all linear layers.")

    # -- prompts -------------------------------------------------------------------------------
    prompts: str = _f("arithmetic", "'arithmetic' (built-in demo task) or a JSONL file of {\"prompt\", \"answer\"} rows.")
    eval_prompts: str | None = _f(None, "JSONL of held-out rows; with prompts=arithmetic, a fresh disjoint set.")
    num_train_prompts: int = _f(1000, "Training prompts drawn for the arithmetic task.")
    num_eval_prompts: int = _f(100, "Held-out prompts scored greedily for `eval/reward`.")
    system_prompt: str | None = _f(None, "System message put before every prompt (a format hint helps small models).")
    max_prompt_tokens: int = _f(128, "Longer prompts are an error naming their row.")

    # -- rollout -------------------------------------------------------------------------------
    estimator: str = _f("ppo", "'ppo' (critic + GAE), 'grpo' (group-normalised) or 'rloo' (leave-one-out).")
    steps: int = _f(100, "PPO steps: rollout, scoring, update, adapter sync.")
    prompts_per_step: int = _f(4, "Prompts sampled per step.")
    generations_per_prompt: int = _f(4, "Completions per prompt (the group for GRPO/RLOO; >= 2 there).")
    max_new_tokens: int = _f(16, "Completion length limit.")
    temperature: float = _f(0.8, "Sampling temperature for rollouts (0.7-1.0 explores without babbling).")
    top_p: float = _f(1.0, "Nucleus sampling for rollouts; 1.0 keeps the log-probs of the full distribution.")
    engine: str = _f("auto", "Rollout engine: 'vllm', 'hf' (transformers generate on the shared base) or 'auto'.")
    engine_options: dict[str, Any] = _f(dict, "Extra keyword arguments for align.rollout.make_engine.")
    rollout_dtype: str | None = _f(None, "vLLM engine dtype (default: dtype). bfloat16 samples ~2.4x faster on CPUs with AMX "
                                         "(scripts/bench/rollout.py); the sync probe's tolerance is then 0.25 instead of 1e-4, "
                                         "and the update still uses the trainer's own log-probs (see logprob/mismatch_*).")

    # -- rewards -------------------------------------------------------------------------------
    reward_functions: dict[str, float] = _f({"arithmetic": 1.0},
                                            "Programmatic rewards {spec: weight}; spec 'arithmetic' or 'module:function'.")
    reward_model: str | None = _f(None, "Reward adapter folder (align reward); attached to the same base, frozen.")
    reward_model_weight: float = _f(1.0, "Weight of the reward adapter's score in the total reward.")

    # -- optimisation --------------------------------------------------------------------------
    lr: float = _f(1e-4, "Policy adapter learning rate. LoRA rule of thumb: 10x the full-fine-tuning lr "
                         "(1e-5 full -> 1e-4 LoRA), nearly independent of rank at alpha 32.")
    critic_lr: float | None = _f(None, "Critic adapter + value head learning rate (default: lr).")
    weight_decay: float = _f(0.0, "AdamW weight decay on adapters and head.")
    epochs: int = _f(2, "Passes over each rollout batch (PPO epochs).")
    minibatch_size: int = _f(8, "Sequences per gradient step.")
    max_grad_norm: float = _f(1.0, "Gradient clipping (total norm over all trained parameters).")
    clip_eps: float = _f(0.2, "PPO ratio clipping: the policy moves at most this far per rollout.")
    value_clip: float | None = _f(0.2, "Value clipping around the old values (null: plain squared error).")
    vf_coef: float = _f(0.5, "Weight of the value loss.")
    entropy_coef: float = _f(0.0, "Entropy bonus weight (0: off).")
    gamma: float = _f(1.0, "Discount per token (1.0: the score at the end counts fully for every token).")
    lam: float = _f(0.95, "GAE lambda: lower trusts the critic more (less variance, more bias).")
    whiten_advantages: bool = _f(True, "Normalise advantages over the batch (PPO); GRPO's are already normalised.")

    # -- KL to the reference -------------------------------------------------------------------
    kl_estimator: str = _f("k1", "Per-token KL estimator: 'k1' (log p - log q) or 'k3' (non-negative, lower variance).")
    kl_in_reward: bool = _f(True, "True: subtract kl_coef*KL from per-token rewards; False: add it as a loss term.")
    kl_coef: float = _f(0.05, "Initial KL coefficient (beta); 0 disables the penalty.")
    kl_target: float | None = _f(None, "Adaptive KL: steer the coefficient towards this KL (null: fixed coefficient).")
    kl_horizon: int = _f(10000, "Adaptive KL controller horizon in sequences.")
    max_kl: float = _f(20.0, "Stop with TrainingDiverged when the mean KL to the reference exceeds this.")

    # -- bookkeeping ---------------------------------------------------------------------------
    eval_every: int = _f(10, "Score the held-out prompts greedily every N steps (0: only at start and end).")
    save_every: int = _f(10, "Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = _f(2, "How many checkpoints to keep.")
    tensorboard: bool = _f(True, "Mirror metrics to TensorBoard under output_dir/tb.")

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {list(ESTIMATORS)}, got {self.estimator!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator: expected 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.estimator in ("grpo", "rloo") and self.generations_per_prompt < 2:
            raise ValueError(f"generations_per_prompt: {self.estimator} compares completions of the same prompt; "
                             f"expected >= 2, got {self.generations_per_prompt}")
        for name in ("steps", "prompts_per_step", "generations_per_prompt", "max_new_tokens", "epochs",
                     "minibatch_size", "max_prompt_tokens", "num_eval_prompts", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0 for sampling, got {self.temperature}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam: expected numbers in [0, 1], got {self.gamma}, {self.lam}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"kl_target: expected a positive number or null, got {self.kl_target}")
        if not self.reward_functions and self.reward_model is None:
            raise ValueError("reward_functions and reward_model: expected at least one source of reward")
        if self.rollout_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"rollout_dtype: expected float32, bfloat16, float16 or null, got {self.rollout_dtype!r}")
        if self.engine not in ("auto", "vllm", "hf"):
            raise ValueError(f"engine: expected 'auto', 'vllm' or 'hf', got {self.engine!r}")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.generations_per_prompt
