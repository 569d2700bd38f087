"""The checks PPOConfig runs on itself: one line naming the field and what was expected, before any model loads."""

from __future__ import annotations

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ENGINES = ("auto", "vllm", "hf", "remote")


def _positive_ints(c, *names: str) -> None:
    for name in names:
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")


def check_ppo_fields(c) -> None:
    """Steps, batch shape, sampling and the PPO/KL knobs."""
    if c.num_train_epochs != 1 and c.max_steps != -1:
        raise ValueError("num_train_epochs: with max_steps set, the run takes max_steps rollout steps; "
                         "set one of them")
    if c.algorithm in ("grpo", "rloo") and c.num_generations < 2:
        raise ValueError(f"num_generations: {c.algorithm} compares completions of the same prompt; "
                         f"expected >= 2, got {c.num_generations}")
    _positive_ints(c, "num_generations", "max_completion_length", "num_iterations", "max_prompt_length",
                   "num_eval_prompts", "num_train_prompts", "prompts_per_step", "steps_per_generation",
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
    if not 0 < c.top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {c.top_p}")
    if c.temperature <= 0:
        raise ValueError(f"temperature: expected > 0 for sampling, got {c.temperature}")
    if c.top_k < 0 and c.top_k != -1:
        raise ValueError(f"top_k: expected 0 (off) or a positive integer, got {c.top_k}")
    if c.min_p is not None and not 0 <= c.min_p <= 1:
        raise ValueError(f"min_p: expected a number in [0, 1] or null, got {c.min_p}")
    if c.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty: expected > 0, got {c.repetition_penalty}")
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
    if c.rollout_dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"rollout_dtype: expected float32, bfloat16, float16 or null, got {c.rollout_dtype!r}")


def check_grpo_fields(c) -> None:
    """TRL's loss family and reward settings."""
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
    if not isinstance(c.reward_funcs, list) or not all(isinstance(f, str) for f in c.reward_funcs):
        raise ValueError("reward_funcs: expected a list of names (dotted import paths or built-ins); pass "
                         "Python functions to the trainer as reward_funcs= instead")
    n = len(c.reward_funcs) + (c.reward_model_name_or_path is not None)
    if c.reward_weights is not None and len(c.reward_weights) != n:
        raise ValueError(f"reward_weights: {len(c.reward_weights)} weights for {n} rewards (the reward model "
                         f"first, then reward_funcs); expected one each")
    if c.num_completions_to_print is not None and c.num_completions_to_print < 0:
        raise ValueError(f"num_completions_to_print: expected >= 0 or null, got {c.num_completions_to_print}")


def check_rollout_engine(c) -> None:
    if c.engine not in ENGINES:
        raise ValueError(f"engine: expected one of {list(ENGINES)}, got {c.engine!r}")
    if c.vllm_mode not in ("colocate", "server"):
        raise ValueError(f"vllm_mode: expected colocate or server, got {c.vllm_mode!r}")
    urls = c.server_urls
    if c.rollout_engine == "remote":
        if not urls:
            raise ValueError("vllm_server_base_url: rollouts from servers need their URLs, e.g. "
                             "http://127.0.0.1:8000 (start one with `align serve --base BASE --adapter_dir DIR`)")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"vllm_server_base_url: expected http:// or https:// URLs, got {url!r}")
        if len(set(urls)) != len(urls):
            raise ValueError(f"vllm_server_base_url: {urls} names a server twice")
    elif urls:
        raise ValueError(f"vllm_server_base_url: only used with use_vllm: true + vllm_mode: server, or engine: "
                         f"remote (the engine is {c.rollout_engine!r})")
    if c.load_in_4bit and c.rollout_engine in ("vllm", "remote"):
        raise ValueError(f"load_in_4bit: a {c.rollout_engine} engine samples from the full-precision base, whose "
                         f"log-probs differ from the 4-bit policy's (the sync probe would fail); use engine: hf")
    if not 0 < c.vllm_gpu_memory_utilization <= 1:
        raise ValueError(f"vllm_gpu_memory_utilization: expected a fraction in (0, 1], "
                         f"got {c.vllm_gpu_memory_utilization}")
    if c.vllm_enable_sleep_mode and (c.rollout_engine not in ("vllm", "auto") or not c.device.startswith("cuda")):
        raise ValueError(f"vllm_enable_sleep_mode: vLLM's sleep mode needs an in-process vLLM engine on a CUDA "
                         f"device (engine: {c.rollout_engine}, device: {c.device}); set it to false")
