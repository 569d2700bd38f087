"""PPOConfig: every knob of `align ppo`, one field each, mirrored exactly by the YAML files in configs/.

Shared settings (model and LoRA, optimisation, run folder, logging) come from TrainConfig
under TRL's names; the PPO-specific ones use TRL's PPO/GRPO names where TRL has one
(num_generations, max_completion_length, num_ppo_epochs, cliprange, kl_coef, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from align.core.policy_init import check_init_fields
from align.train.config import TrainConfig
from align.train.config_parser import arg

ALGORITHMS = ("ppo", "grpo", "rloo")


@dataclass
class PPOConfig(TrainConfig):
    output_dir: str = arg("runs/ppo", "Run folder: metrics.jsonl, tb/, checkpoints/, final adapters.")
    max_steps: int = arg(100, "PPO steps: rollout, scoring, update, adapter sync.")
    learning_rate: float = arg(1e-4, "Policy adapter learning rate. LoRA rule of thumb: 10x the full-fine-tuning "
                                     "lr (1e-5 full -> 1e-4 LoRA), nearly independent of rank at alpha 32.")
    lr_scheduler_type: str = arg("constant", "transformers.get_scheduler name, over optimizer steps.")
    per_device_train_batch_size: int = arg(8, "Sequences per forward/backward pass in the update.")
    eval_steps: int = arg(10, "Score the held-out prompts greedily every N steps (0: only at start and end).")
    save_steps: int = arg(10, "Checkpoint every N steps and at the end (0: only at the end).")

    # -- prompts -------------------------------------------------------------------------------
    prompts: str = arg("arithmetic", "'arithmetic' (built-in demo task) or a JSONL file of {\"prompt\", \"answer\"} "
                                     "rows.")
    eval_prompts: str | None = arg(None, "JSONL of held-out rows; with prompts=arithmetic, a fresh disjoint set.")
    num_train_prompts: int = arg(1000, "Training prompts drawn for the arithmetic task.")
    num_eval_prompts: int = arg(100, "Held-out prompts scored greedily for `eval/reward`.")
    system_prompt: str | None = arg(None, "System message put before every prompt (a format hint helps small models).")
    max_prompt_length: int = arg(128, "Longer prompts are an error naming their row.")

    # -- rollout -------------------------------------------------------------------------------
    algorithm: str = arg("ppo", "'ppo' (critic + GAE), 'grpo' (group-normalised) or 'rloo' (leave-one-out).")
    prompts_per_step: int = arg(4, "Prompts sampled per step.")
    num_generations: int = arg(4, "Completions per prompt (the group for GRPO/RLOO; >= 2 there).")
    max_completion_length: int = arg(16, "Completion length limit in tokens.")
    temperature: float = arg(0.8, "Sampling temperature for rollouts (0.7-1.0 explores without babbling).")
    top_p: float = arg(1.0, "Nucleus sampling for rollouts; 1.0 keeps the log-probs of the full distribution.")
    engine: str = arg("auto", "Rollout engine: 'vllm', 'hf' (transformers generate on the shared base), 'remote' "
                              "(a running `align serve` or vLLM server at engine_url) or 'auto'.")
    engine_options: dict[str, Any] = arg({}, "Extra keyword arguments for align.engines.make_engine.")
    rollout_dtype: str | None = arg(None, "vLLM engine dtype (default: dtype). bfloat16 samples ~2.4x faster on "
                                          "CPUs with AMX; the sync probe's tolerance is then 0.25 instead of 1e-4 "
                                          "(docs/design.md, 'Rollout engines and adapter sync').")
    sampler_logprobs_as_old: bool | None = arg(None, "Take pi_old, the PPO ratio's denominator, from the "
        "sampler's log-probs instead of a forward pass of the trainer (one forward less per step). null: when "
        "no reference forward runs (kl_coef 0) and an in-process engine samples in the training dtype, where "
        "the sync probe holds it to the trainer within 1e-4. logprob/mismatch and policy/entropy then come "
        "from the first update's forward.")
    engine_url: str | None = arg(None, "engine: remote: the server's base URL, e.g. http://127.0.0.1:8000 (start it "
                                       "with `align serve --base BASE --adapter_dir DIR`).")
    engine_api_key_env: str = arg("ALIGN_API_KEY", "engine: remote: environment variable holding the server's API "
                                                   "key (a key in a config file would be copied into the run folder).")
    engine_adapter_dir: str | None = arg(None, "engine: remote: folder the server loads adapters from (inside its "
                                               "--adapter_dir); null: /dev/shm, i.e. a server on this machine.")
    vllm_gpu_memory_utilization: float = arg(0.3, "engine: vllm on CUDA: fraction of the GPU's memory vLLM may take "
                                                  "(weights + KV cache); the rest is the trainer's. Ignored on CPU.")
    vllm_enable_sleep_mode: bool = arg(False, "engine: vllm on CUDA: after each rollout vLLM sleeps (weights to CPU, "
                                              "KV cache freed) while the trainer steps, and wakes to sample. Frees "
                                              "GPU memory, costs a weight copy per step. CUDA only.")

    # -- rewards -------------------------------------------------------------------------------
    reward_functions: dict[str, float] = arg({"arithmetic": 1.0}, "Programmatic rewards {spec: weight}; spec "
                                                                  "'arithmetic' or 'module:function'.")
    reward_model: str | None = arg(None, "Reward model, frozen: align's reward folder (attached to the same "
                                         "base), or a sequence classifier's folder or hub id.")
    reward_model_weight: float = arg(1.0, "Weight of the reward model's score in the total reward.")

    # -- the update ----------------------------------------------------------------------------
    critic_learning_rate: float | None = arg(None, "Critic adapter + value head learning rate (default: "
                                                   "learning_rate).")
    num_ppo_epochs: int = arg(2, "Passes over each rollout batch.")
    cliprange: float = arg(0.2, "PPO ratio clipping: the policy moves at most this far per rollout.")
    cliprange_value: float | None = arg(0.2, "Value clipping around the old values (null: plain squared error).")
    vf_coef: float = arg(0.5, "Weight of the value loss.")
    entropy_coef: float = arg(0.0, "Entropy bonus weight (0: off).")
    gamma: float = arg(1.0, "Discount per token (1.0: the score at the end counts fully for every token).")
    lam: float = arg(0.95, "GAE lambda: lower trusts the critic more (less variance, more bias).")
    whiten_advantages: bool = arg(True, "Normalise advantages over the batch (PPO); GRPO's are already normalised.")

    # -- KL to the reference -------------------------------------------------------------------
    kl_estimator: str = arg("k1", "Per-token KL estimator: 'k1' (log p - log q) or 'k3' (non-negative, lower "
                                  "variance).")
    kl_in_reward: bool = arg(True, "True: subtract kl_coef*KL from per-token rewards; False: add it as a loss term.")
    kl_coef: float = arg(0.05, "Initial KL coefficient (beta); 0 disables the penalty.")
    kl_target: float | None = arg(None, "Adaptive KL: steer the coefficient towards this KL (null: fixed).")
    kl_horizon: int = arg(10000, "Adaptive KL controller horizon in sequences.")
    log_reference_kl: bool = arg(False, "With kl_coef 0, still run the reference forward to log kl/ref (costs one "
                                        "forward pass per step; otherwise skipped and not logged).")
    max_kl: float = arg(20.0, "Stop with TrainingDiverged when the mean KL to the reference exceeds this.")
    init_adapter: str | None = arg(None, "PEFT adapter folder the policy starts from (e.g. an SFT run's adapter/).")
    reference: str | None = arg(None, "'init': the reference is the starting adapter, frozen, on the same base "
                                      "(default with init_adapter); 'base': adapters off (default without).")

    RENAMED = {**TrainConfig.RENAMED, "estimator": "algorithm", "epochs": "num_ppo_epochs",
               "minibatch_size": "per_device_train_batch_size", "generations_per_prompt": "num_generations",
               "max_new_tokens": "max_completion_length", "max_prompt_tokens": "max_prompt_length",
               "clip_eps": "cliprange", "value_clip": "cliprange_value", "critic_lr": "critic_learning_rate"}

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps: PPO needs a positive number of steps, got {self.max_steps}")
        if self.num_train_epochs != 1:
            raise ValueError("num_train_epochs: PPO runs max_steps rollout steps; use num_ppo_epochs for passes "
                             "over each rollout batch")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator: expected 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.algorithm in ("grpo", "rloo") and self.num_generations < 2:
            raise ValueError(f"num_generations: {self.algorithm} compares completions of the same prompt; "
                             f"expected >= 2, got {self.num_generations}")
        for name in ("prompts_per_step", "num_generations", "max_completion_length", "num_ppo_epochs",
                     "max_prompt_length", "num_eval_prompts", "num_train_prompts"):
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
        if self.critic_learning_rate is not None and self.critic_learning_rate <= 0:
            raise ValueError(f"critic_learning_rate: expected > 0, got {self.critic_learning_rate}")
        if not self.reward_functions and self.reward_model is None:
            raise ValueError("reward_functions and reward_model: expected at least one source of reward")
        if self.rollout_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"rollout_dtype: expected float32, bfloat16, float16 or null, got {self.rollout_dtype!r}")
        self._check_engine()
        check_init_fields(self)

    def _check_engine(self) -> None:
        if self.engine not in ("auto", "vllm", "hf", "remote"):
            raise ValueError(f"engine: expected 'auto', 'vllm', 'hf' or 'remote', got {self.engine!r}")
        if self.engine == "remote" and not str(self.engine_url or "").startswith(("http://", "https://")):
            raise ValueError(f"engine_url: engine: remote needs the server's http:// or https:// URL, "
                             f"got {self.engine_url!r}")
        if self.engine != "remote" and self.engine_url is not None:
            raise ValueError(f"engine_url: only used with engine: remote (engine is {self.engine!r})")
        if self.load_in_4bit and self.engine in ("vllm", "remote"):
            raise ValueError(f"load_in_4bit: engine: {self.engine} samples from the full-precision base, whose "
                             f"log-probs differ from the 4-bit policy's (the sync probe would fail); use engine: hf")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization: expected a fraction in (0, 1], "
                             f"got {self.vllm_gpu_memory_utilization}")
        if self.vllm_enable_sleep_mode and (self.engine not in ("vllm", "auto") or not self.device.startswith("cuda")):
            raise ValueError(f"vllm_enable_sleep_mode: vLLM's sleep mode needs engine: vllm on a CUDA device "
                             f"(engine: {self.engine}, device: {self.device}); set it to false")

    @property
    def rollout_engine(self) -> str:
        """The engine kind to build: 'auto' means transformers on a 4-bit base (see _check_engine)."""
        return "hf" if self.load_in_4bit and self.engine == "auto" else self.engine

    def rollout_engine_options(self) -> dict[str, Any]:
        """Keyword arguments for align.engines.make_engine: engine_options plus what the fields above set."""
        options = dict(self.engine_options)
        if self.engine == "remote":
            options.setdefault("url", self.engine_url)
            if os.environ.get(self.engine_api_key_env):
                options.setdefault("api_key", os.environ[self.engine_api_key_env])
            if self.engine_adapter_dir is not None:
                options.setdefault("adapter_dir", self.engine_adapter_dir)
        elif self.rollout_engine in ("vllm", "auto") and self.device.startswith("cuda"):
            options.setdefault("gpu_memory_utilization", self.vllm_gpu_memory_utilization)
            if self.vllm_enable_sleep_mode:
                options.setdefault("enable_sleep_mode", True)
        return options

    @property
    def batch_size(self) -> int:
        """Sequences per rollout: prompts x generations."""
        return self.prompts_per_step * self.num_generations
