"""What every rollout engine provides, and the check that it serves the trainer's current adapter.

An engine samples completions with a named adapter active, scores fixed continuations, and
receives the trainer's adapter after each update (`sync`). The guard against the classic silent
failure (the adapter never reaches the engine and rollouts keep sampling the initial policy) is
`verify_adapter`: after every sync the engine's log-probs of a fixed probe sequence must equal the
trainer's own (`align.core.logprobs.completion_logprobs`) within a tolerance for the engine's dtype.

Log-prob convention: `Sample.logprobs` and `RolloutEngine.logprobs` are log-probs of the model's
own next-token distribution (temperature 1, no top-p/top-k/min-p, no repetition penalty), i.e. what
the trainer's scoring pass computes, whatever sampling knobs the sampler used. vLLM returns exactly
these by default (`logprobs_mode="raw_logprobs"`: taken before penalties, temperature and the
top-k/top-p/min-p filters); HFEngine takes them from the raw logits (`output_logits`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from align.core.errors import UserError

# Float32 engines match transformers within ~1e-6; bf16 drifts up to ~3.5e-2 with LoRA and up to 0.17
# when the adapter is folded into bf16 weights (docs/design.md, "Rollout engines and adapter sync";
# measured with SmolLM2 by scripts/bench/rollout.py).
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

# The knobs `generate` takes as arguments: `generation_kwargs` may not set them a second time.
SAMPLING_ARGUMENTS = ("n", "max_new_tokens", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                      "repetition_penalty", "seed", "ignore_eos")


class GenerationKwargsError(UserError, ValueError):
    """A `generation_kwargs` key the engine does not know, or one it sets itself."""


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 adapter: AdapterArg = "policy", ignore_eos: bool = False, *, top_k: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0,
                 generation_kwargs: dict | None = None) -> list[list[Sample]]:
        """Sample `n` completions per prompt. Outer list: prompts; inner: samples.

        `adapter` is an adapter name, None (the reference: all adapters off), or one
        of those per prompt. temperature 0 means greedy. `ignore_eos` generates exactly
        `max_new_tokens` per completion (a fixed workload, as throughput benchmarks use).
        TRL's GRPOConfig knobs: `top_k` (0 or -1: off, TRL's default 0), `min_p` (0: off;
        TRL's None), `repetition_penalty` (1: off; prompt and completion tokens both count),
        `generation_kwargs` (more fields of the engine's own sampler: vLLM SamplingParams,
        transformers GenerationConfig); an unknown key is a GenerationKwargsError.
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
    from align.core.logprobs import completion_logprobs

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
                   top_p: float, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0) -> None:
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
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise ValueError(f"top_k: expected a whole number >= 1, or 0 or -1 for off, got {top_k!r}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p: expected a number in [0, 1] (0 = off), got {min_p}")
    if not 0 < repetition_penalty < float("inf"):
        raise ValueError(f"repetition_penalty: expected a finite number > 0 (1 = off), got {repetition_penalty}")


def check_generation_kwargs(generation_kwargs: dict | None, known, engine: str) -> dict:
    """`generation_kwargs` as a dict, once each key is one the engine's sampler (`known`) takes and
    `generate` does not set from its own arguments; else a one-line GenerationKwargsError."""
    extra = dict(generation_kwargs or {})
    for key in extra:
        if key in SAMPLING_ARGUMENTS:
            raise GenerationKwargsError(f"generation_kwargs: {key!r} is an argument of generate; pass it there")
        if key not in known:
            raise GenerationKwargsError(f"generation_kwargs: {key!r} is not a field {engine} knows")
    return extra


class VerifiedSyncEngine:
    """Base of engines that hold their own copy of the weights: `sync` sends the adapter, then runs the probe.

    A subclass implements `_send(base, adapter) -> bytes sent`; `_init_probe` sets the probe up.
    """

    def _init_probe(self, base, dtype: str, verify_tol: float | None,
                    probe: tuple[list[int], list[int]] | None) -> None:
        self.tokenizer = base.tokenizer
        self.verify_tol = verify_tol if verify_tol is not None else DEFAULT_TOL.get(dtype, 1e-1)
        self.probe = probe or probe_ids(base.tokenizer)
        self._probe_history: dict[str | None, list[float]] = {}  # trainer probe log-probs at the last sync

    def _send(self, base, adapter: str) -> int:
        raise NotImplementedError

    def sync(self, base, adapter: str = "policy") -> SyncStats:
        """Send `adapter`'s current weights (adapter only, never the base), then verify with the probe."""
        start = time.perf_counter()
        nbytes = self._send(base, adapter)
        diff = verify_adapter(self, base, adapter, *self.probe, tol=self.verify_tol, history=self._probe_history)
        return SyncStats(bytes=nbytes, seconds=time.perf_counter() - start, max_abs_diff=diff)


def generate_with_progress(engine, prompt_ids: list[list[int]], desc: str, n: int = 1, parts: int = 10,
                           min_sequences: int = 256, **kwargs) -> list[list[Sample]]:
    """`engine.generate(prompt_ids, n=n, **kwargs)` in up to `parts` batches behind a tqdm bar counting prompts.

    For a long one-off generation (the demo's evaluations and sampling) that would otherwise print nothing
    for minutes. A batch holds at least `min_sequences` sequences (prompts x n): vLLM on a CPU decodes up to
    256 at once, and smaller batches cost more steps (SmolLM2, 100 greedy prompts: 17 s in one call, 72 s
    in ten). So a short generation is one batch, its bar moving once. An adapter list (one per prompt) is
    cut with the prompts.
    """
    from tqdm import tqdm

    size = max(1, -(-len(prompt_ids) // parts), -(-min_sequences // n))
    adapter = kwargs.pop("adapter", "policy")
    out: list[list[Sample]] = []
    # mininterval 0: a handful of updates, each shown (tqdm's default skips redraws closer than 0.1 s).
    with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", mininterval=0) as bar:
        for i in range(0, len(prompt_ids), size):
            part = adapter[i:i + size] if isinstance(adapter, list) else adapter
            out += engine.generate(prompt_ids[i:i + size], n=n, adapter=part, **kwargs)
            bar.update(len(prompt_ids[i:i + size]))
    return out
