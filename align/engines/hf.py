"""`HFEngine`: transformers `generate` on the trainer's own SharedBase.

No second copy of the weights and nothing to send: the sampler is the trainer's model, so every
update reaches it at once. Slower than vLLM.
"""

from __future__ import annotations

import time
from itertools import groupby

import torch

from align.engines.protocol import (
    AdapterArg,
    Sample,
    SyncStats,
    check_generation_kwargs,
    check_sampling,
    per_prompt_adapters,
    trainer_logprobs,
)

# GenerationConfig fields this engine sets to get one sampled sequence per row and its raw logits back.
OWN_GENERATION_FIELDS = frozenset({
    "max_length", "num_return_sequences", "return_dict_in_generate", "output_logits", "output_scores", "pad_token_id",
    "eos_token_id", "do_sample", "num_beams", "num_beam_groups", "min_new_tokens", "transformers_version",
    "_from_model_config"})


def generation_config_fields() -> frozenset[str]:
    """What transformers' GenerationConfig takes, less the fields HFEngine sets itself."""
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict()) - OWN_GENERATION_FIELDS


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
                 adapter: AdapterArg = "policy", ignore_eos: bool = False, *, top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, generation_kwargs: dict | None = None):
        check_sampling(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty)
        knobs = check_generation_kwargs(generation_kwargs, generation_config_fields(), "transformers GenerationConfig")
        # min_p None: transformers adds its processor for any value, 0 included; top_k 0 and penalty 1 are off.
        knobs.update(top_k=max(top_k, 0), min_p=min_p or None, repetition_penalty=float(repetition_penalty))
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
                                          temperature, top_p, name, ignore_eos, knobs)
                    for i, samples in zip(chunk, outs, strict=True):
                        results[i] = samples
            if seed is None and self.generator_state is not None:
                self.generator_state = torch.get_rng_state()
        return results

    @torch.no_grad()
    def _generate(self, prompts, n, max_new_tokens, temperature, top_p, adapter, ignore_eos=False, knobs=None):
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
        knobs = dict(knobs or {})
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=knobs.pop("top_k", 0))
        else:  # greedy: only the processors that can change the argmax (repetition penalty) still apply
            knobs.update(top_k=None, min_p=None)
            kwargs.update(do_sample=False, temperature=None, top_p=None)
        kwargs.update(knobs)
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
        if adapter is not None and adapter not in base.adapters:  # None: the base's own (full fine-tuning)
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

