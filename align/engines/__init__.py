"""Rollout engines: sample completions with the current policy adapter, and prove the engine has it.

    engine = make_engine("auto", model_path, base)      # vLLM if importable, else transformers
    stats = engine.sync(base, "policy")                 # adapter only (None: full weights); raises AdapterSyncError on mismatch
    samples = engine.generate(prompt_ids, n=4, max_new_tokens=48, temperature=0.7, seed=0)

- protocol.py: what every engine provides (`RolloutEngine`, `Sample`, `SyncStats`) and the probe
  check run after every sync (`verify_adapter`);
- hf.py: `HFEngine`, transformers `generate` on the trainer's own SharedBase (nothing to sync);
- vllm_local.py: `VLLMEngine`, an in-process vLLM with its own copy of the base, sent only the
  adapter ("fold" or "lora" sync); fold.py is the fold maths, vllm_compat.py every vLLM internal;
- remote.py: `RemoteEngine`, one or several running vLLM servers or `align serve`s, prompts sharded
  over them; remote_server.py is one server's client, re-sent its adapters if that server restarts;
- `SleepingEngine` (here): a CUDA vLLM engine that sleeps between rollouts, so the trainer has the GPU.
"""

from __future__ import annotations

from align.engines.hf import HFEngine
from align.engines.protocol import (
    DEFAULT_TOL,
    AdapterArg,
    AdapterSyncError,
    GenerationKwargsError,
    RolloutEngine,
    Sample,
    SyncStats,
    check_probe,
    generate_with_progress,
    probe_ids,
    trainer_logprobs,
    verify_adapter,
)
from align.engines.remote import RemoteEngine
from align.engines.vllm_local import VLLMEngine

__all__ = [
    "DEFAULT_TOL", "ENGINE_KINDS", "AdapterArg", "AdapterSyncError", "GenerationKwargsError", "HFEngine", "RemoteEngine",
    "RolloutEngine", "Sample", "SleepingEngine", "SyncStats", "VLLMEngine", "check_probe", "generate_with_progress",
    "make_engine", "probe_ids", "trainer_logprobs",
    "verify_adapter", "vllm_available",
]

ENGINE_KINDS = ("auto", "vllm", "hf", "remote")
# Options only an in-process vLLM understands; "auto" drops them when it falls back to transformers.
VLLM_ONLY_OPTIONS = ("gpu_memory_utilization", "enable_sleep_mode")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # a broken install (e.g. mismatched torchvision) counts as unavailable
        return False
    return True


def make_engine(kind: str, model_path: str, base, dtype: str = "float32", **options) -> RolloutEngine:
    """A rollout engine of `kind`: "auto" (vLLM if importable, else HF) | "vllm" | "hf" | "remote".

    Options go to the engine: VLLMEngine(sync_mode="fold" (default) | "lora", max_lora_rank, seed, max_model_len,
    kv_cache_gib, verify_tol, probe, ...), HFEngine(batch_size, seed),
    RemoteEngine(url (one base URL or a list), adapter_dir, served_model, verify_tol, probe, timeout, api_key,
    reconnect_timeout).
    vLLM also takes gpu_memory_utilization and enable_sleep_mode (CUDA: the engine is a SleepingEngine).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"rollout engine kind: expected one of {ENGINE_KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
        if kind == "hf":
            options = {k: v for k, v in options.items() if k not in VLLM_ONLY_OPTIONS}
    if kind == "hf":
        return HFEngine(base, model_path, dtype, **options)
    if kind == "vllm":
        engine = VLLMEngine(model_path, base, dtype, **options)
        return SleepingEngine(engine) if options.get("enable_sleep_mode") else engine
    return RemoteEngine(model_path, base, dtype, **options)


class SleepingEngine:
    """A vLLM engine that sleeps after each rollout and wakes on its next call (vLLM sleep mode, CUDA only).

    Level 1 sleep moves the weights to CPU memory and frees the KV cache, so the trainer's update has
    the GPU to itself; waking copies the weights back. Level 1, not 2: level 2 discards the weights,
    and a "fold" engine's weights hold the folded adapter. A PPO step calls generate (wake, sample,
    sleep), updates, then sync (wake; stays awake for the next generate).
    """

    def __init__(self, engine: VLLMEngine, level: int = 1):
        self.engine, self.level, self.asleep = engine, level, False

    def _wake(self) -> None:
        if self.asleep:
            self.engine.llm.wake_up()
            self.asleep = False

    def generate(self, *args, **kwargs):
        self._wake()
        try:
            return self.engine.generate(*args, **kwargs)
        finally:
            self.engine.llm.sleep(level=self.level)
            self.asleep = True

    def sync(self, base, adapter: str = "policy") -> SyncStats:
        self._wake()
        return self.engine.sync(base, adapter)

    def logprobs(self, *args, **kwargs):
        self._wake()
        return self.engine.logprobs(*args, **kwargs)

    def close(self) -> None:
        self.engine.close()

    def __getattr__(self, name):  # sync_mode, probe, llm, ...: the wrapped engine's
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)
