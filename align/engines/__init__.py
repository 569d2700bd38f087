"""Rollout engines: sample completions with the current policy adapter, and prove the engine has it.

    engine = make_engine("auto", model_path, base)      # vLLM if importable, else transformers
    stats = engine.sync(base, "policy")                 # adapter only; raises AdapterSyncError on mismatch
    samples = engine.generate(prompt_ids, n=4, max_new_tokens=48, temperature=0.7, seed=0)

- protocol.py: what every engine provides (`RolloutEngine`, `Sample`, `SyncStats`) and the probe
  check run after every sync (`verify_adapter`);
- hf.py: `HFEngine`, transformers `generate` on the trainer's own SharedBase (nothing to sync);
- vllm_local.py: `VLLMEngine`, an in-process vLLM with its own copy of the base, sent only the
  adapter ("fold" or "lora" sync); fold.py is the fold maths, vllm_compat.py every vLLM internal;
- remote.py: `RemoteEngine`, a running vLLM server.
"""

from __future__ import annotations

from align.engines.hf import HFEngine
from align.engines.protocol import (
    DEFAULT_TOL,
    AdapterArg,
    AdapterSyncError,
    RolloutEngine,
    Sample,
    SyncStats,
    check_probe,
    probe_ids,
    trainer_logprobs,
    verify_adapter,
)
from align.engines.remote import RemoteEngine
from align.engines.vllm_local import VLLMEngine

__all__ = [
    "DEFAULT_TOL", "ENGINE_KINDS", "AdapterArg", "AdapterSyncError", "HFEngine", "RemoteEngine", "RolloutEngine",
    "Sample", "SyncStats", "VLLMEngine", "check_probe", "make_engine", "probe_ids", "trainer_logprobs",
    "verify_adapter", "vllm_available",
]

ENGINE_KINDS = ("auto", "vllm", "hf", "remote")


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
    RemoteEngine(url, adapter_dir, served_model, verify_tol, probe, timeout).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"rollout engine kind: expected one of {ENGINE_KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "hf":
        return HFEngine(base, model_path, dtype, **options)
    if kind == "vllm":
        return VLLMEngine(model_path, base, dtype, **options)
    return RemoteEngine(model_path, base, dtype, **options)
