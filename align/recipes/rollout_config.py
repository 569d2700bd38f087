"""RolloutConfig: the fields every recipe that samples from its own policy shares (PPO/GRPO/RLOO, online DPO).

Prompts (any source DPO reads, or the built-in task), the rollout engine and its sampling knobs,
the reward functions, and the starting adapter, under TRL's names. A recipe adds its own update
fields, and names its completion-length and reward-model fields as its TRL config does: it exposes
them as `max_completion_length` and `reward_model_name_or_path`, which the shared run reads
(align/recipes/rollout_run.py). Every check is one line naming the field, before any model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from align.core.policy_init import check_init_fields
from align.train.config import PreferenceDataConfig, TrainConfig
from align.train.config_parser import arg
from align.train.full_finetune import check_full_finetune, use_peft_field

ENGINES = ("auto", "vllm", "hf", "remote")


@dataclass
class RolloutConfig(TrainConfig):
    # -- prompts: any source DPO reads, plus the built-in task -----------------------------------
    train_file: str = arg("arithmetic", "Prompt rows: .jsonl/.json/.parquet/.csv, a save_to_disk folder, a folder "
                                        "of data files, a dataset name, or 'arithmetic' (the built-in demo task). "
                                        "Each row has a string or conversational 'prompt'; every other column is "
                                        "passed to the reward functions by name.")
    eval_file: str | None = arg(None, "Held-out prompt rows (any source train_file takes); with arithmetic, a fresh "
                                      "disjoint set. Scored greedily with the reward functions (eval/reward).")
    dataset_name: str = arg("", "Instead of train_file: a dataset name for datasets.load_dataset (TRL's name).")
    dataset_config: str | None = arg(None, "The dataset's configuration (datasets.load_dataset's second argument).")
    dataset_split: str = arg("train", "The split to train on, for a dataset name or a saved DatasetDict.")
    num_train_prompts: int = arg(1000, "arithmetic: training prompts drawn for the task.")
    num_eval_prompts: int = arg(100, "arithmetic: held-out prompts scored greedily for `eval/reward`.")
    system_prompt: str | None = arg(None, "Ours: a system turn put before conversational (and arithmetic) prompts.")
    max_prompt_length: int = arg(512, "Ours: a longer prompt is an error naming its row (TRL 1.16 has no limit).")

    # -- sampling (TRL's names) ------------------------------------------------------------------
    num_generations: int = arg(8, "Completions per prompt (the group for GRPO/RLOO; >= 2 there).")
    temperature: float = arg(1.0, "Sampling temperature for rollouts.")
    top_p: float = arg(1.0, "Nucleus sampling for rollouts.")
    top_k: int = arg(0, "Top-k sampling (0: off).")
    min_p: float | None = arg(None, "Min-p sampling (null: off).")
    repetition_penalty: float = arg(1.0, "Repetition penalty (1.0: off).")
    generation_kwargs: dict[str, Any] | None = arg(None, "Further sampling parameters for the engine (vLLM "
                                                         "SamplingParams / transformers GenerationConfig names).")

    # -- the rollout engine (TRL's names, and ours) ----------------------------------------------
    use_vllm: bool | None = arg(None, "TRL's switch: true samples with vLLM (vllm_mode says where), false with "
                                      "transformers on the shared base; null: engine decides.")
    vllm_mode: str = arg("colocate", "With use_vllm: 'colocate' (vLLM in this process) or 'server' (the servers at "
                                     "vllm_server_base_url).")
    vllm_server_base_url: str | list[str] | None = arg(None, "Rollout servers (`align serve` or vLLM), one URL or a "
                                                             "list: each rollout is sharded over them.")
    engine: str = arg("auto", "Ours: 'vllm', 'hf' (transformers generate on the shared base), 'remote' (the servers "
                              "at vllm_server_base_url) or 'auto' (vLLM when installed); use_vllm overrides it.")
    engine_options: dict[str, Any] = arg({}, "Extra keyword arguments for align.engines.make_engine.")
    rollout_dtype: str | None = arg(None, "vLLM engine dtype (default: dtype). bfloat16 samples ~2.4x faster on "
                                          "CPUs with AMX; the sync probe's tolerance is then 0.25 instead of 1e-4 "
                                          "(docs/design.md, 'Rollout engines and adapter sync').")
    engine_api_key_env: str = arg("ALIGN_API_KEY", "Servers: environment variable holding their API key (a key in a "
                                                   "config file would be copied into the run folder).")
    engine_adapter_dir: str | None = arg(None, "Servers: folder they load adapters from (inside their "
                                               "--adapter_dir); null: /dev/shm, i.e. servers on this machine.")
    vllm_gpu_memory_utilization: float = arg(0.3, "In-process vLLM on CUDA: fraction of the GPU's memory vLLM may "
                                                  "take; the rest is the trainer's. Ignored on CPU.")
    vllm_enable_sleep_mode: bool = arg(False, "In-process vLLM on CUDA: vLLM sleeps while the trainer steps.")

    # -- rewards (TRL's names) -------------------------------------------------------------------
    reward_funcs: list[str] = arg(["arithmetic"], "Reward functions: dotted import paths (my_lib.rewards.correct) "
                                                  "or built-ins (arithmetic, format, length_penalty); each is called "
                                                  "fn(prompts=, completions=, completion_ids=, **columns).")
    reward_weights: list[float] | None = arg(None, "One weight per reward, in TRL's order: the reward model "
                                                   "first, then reward_funcs (null: all 1).")

    # -- the starting policy ---------------------------------------------------------------------
    init_adapter: str | None = arg(None, "PEFT adapter folder the policy starts from (e.g. an SFT run's adapter/).")
    reference: str | None = arg(None, "'init': the reference is the starting adapter, frozen, on the same base "
                                      "(default with init_adapter); 'base': adapters off (default without).")
    use_peft: bool = use_peft_field()

    # -- the run ---------------------------------------------------------------------------------
    eval_steps: int = arg(10, "Score the held-out prompts greedily every N steps (0: only at start and end).")
    save_steps: int | None = arg(None, "Checkpoint every N steps and at the end (0: only at the end; null: every "
                                       "10, or only at the end with use_peft: false).")

    SAVE_STEPS = 10
    PYTHON_DATA = PreferenceDataConfig.PYTHON_DATA
    REWARD_MODEL_FIELD = "reward_model_name_or_path"  # what the recipe's TRL config calls its reward model

    def __post_init__(self):
        super().__post_init__()
        if self.train_file and self.dataset_name and self.train_file != "arithmetic":
            raise ValueError("train_file and dataset_name: choose one")
        check_sampling(self)
        check_rewards(self)
        check_rollout_engine(self)
        check_init_fields(self)
        check_full_finetune(self)
        if not self.use_peft and self.rollout_engine == "remote":
            raise ValueError("use_peft: false: a remote engine receives adapters only, not full weights; use "
                             "engine vllm or hf")

    # -- what the fields resolve to ----------------------------------------------------------------
    @property
    def train_source(self) -> str:
        return self.dataset_name or self.train_file

    @property
    def rollout_engine(self) -> str:
        """The engine kind to build: TRL's use_vllm/vllm_mode first, then engine ('auto' on a 4-bit base: hf)."""
        if self.use_vllm is False:
            return "hf"
        if self.use_vllm:
            return "remote" if self.vllm_mode == "server" else "vllm"
        return "hf" if self.load_in_4bit and self.engine == "auto" else self.engine

    @property
    def server_urls(self) -> list[str]:
        urls = self.vllm_server_base_url
        return [] if urls is None else [urls] if isinstance(urls, str) else list(urls)

    def rollout_engine_options(self) -> dict[str, Any]:
        """Keyword arguments for align.engines.make_engine: engine_options plus what the fields above set."""
        options = dict(self.engine_options)
        if self.rollout_engine == "remote":
            urls = self.server_urls
            options.setdefault("url", urls[0] if len(urls) == 1 else urls)
            if os.environ.get(self.engine_api_key_env):
                options.setdefault("api_key", os.environ[self.engine_api_key_env])
            if self.engine_adapter_dir is not None:
                options.setdefault("adapter_dir", self.engine_adapter_dir)
        elif self.rollout_engine in ("vllm", "auto") and self.device.startswith("cuda"):
            options.setdefault("gpu_memory_utilization", self.vllm_gpu_memory_utilization)
            if self.vllm_enable_sleep_mode:
                options.setdefault("enable_sleep_mode", True)
        return options

    def sampling(self) -> dict[str, Any]:
        """The engines' sampling keywords (align/engines/protocol.py `generate`)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "min_p": self.min_p or 0.0, "repetition_penalty": self.repetition_penalty,
                "generation_kwargs": self.generation_kwargs}


def positive_ints(c, *names: str) -> None:
    for name in names:
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")


def check_sampling(c) -> None:
    positive_ints(c, "num_generations", "max_prompt_length", "num_eval_prompts", "num_train_prompts")
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
    if c.rollout_dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"rollout_dtype: expected float32, bfloat16, float16 or null, got {c.rollout_dtype!r}")


def check_rewards(c) -> None:
    """reward_funcs are names; one weight per reward (the reward model first, as TRL orders them)."""
    if not isinstance(c.reward_funcs, list) or not all(isinstance(f, str) for f in c.reward_funcs):
        raise ValueError("reward_funcs: expected a list of names (dotted import paths or built-ins); pass "
                         "Python functions to the trainer as reward_funcs= instead")
    n = len(c.reward_funcs) + (c.reward_model_name_or_path is not None)
    if c.reward_weights is not None and len(c.reward_weights) != n:
        raise ValueError(f"reward_weights: {len(c.reward_weights)} weights for {n} rewards (the reward model "
                         f"first, then reward_funcs); expected one each")


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
