"""`VLLMEngine`: an in-process `vllm.LLM` with its own copy of the base, sent only the adapter.

Two `sync_mode`s (docs/design.md, "Rollout engines and adapter sync"); "fold", the default, samples
1.8x (tiny model) to 2.6x (SmolLM2) faster than "lora" on the 2-core CPU (scripts/bench/rollout.py):

- "lora": the adapter is saved as a PEFT folder (in RAM where possible) and served through vLLM's
  LoRA path with a fresh `lora_int_id` each sync: reusing an id after overwriting the folder keeps
  the OLD weights (docs/design.md, "vLLM on CPU"). The reference (adapter=None) is available from
  the same engine; in a batch that mixes it with adapter requests it is served by an all-zero
  adapter, because vLLM gets such no-adapter requests wrong.
- "fold": the adapter's A/B tensors are folded into the engine's own fused weights (align.engines.fold),
  rebuilt each sync from the trainer's own base tensors (W + scale*B@A in float32, rounded once to
  the engine's dtype; no second copy of the base is kept), and sampling runs on vLLM's fast base path.
  Trade-off: the engine then IS the policy; adapter=None (the reference) and other adapters are
  not available from it.

Full fine-tuning (`use_peft: false`) syncs with adapter=None: every weight of the trainer's base is
loaded into the engine (its decoder linears re-packed as "fold" does), in either mode, then probed.

Every call into vLLM internals goes through align.engines.vllm_compat.
"""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import torch

from align.core.adapter_files import (
    ZERO_ADAPTER_NAME,
    ZeroAdapter,
    folder_bytes,
    scratch_dir,
    vllm_max_lora_rank,
)
from align.engines import vllm_compat
from align.engines.fold import base_linear_weights, folded_weight, fused_layout, lora_factors
from align.engines.protocol import (
    AdapterArg,
    AdapterSyncError,
    Sample,
    VerifiedSyncEngine,
    check_generation_kwargs,
    check_sampling,
    per_prompt_adapters,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# SamplingParams fields this engine sets to read its results back: generation_kwargs may not change them.
OWN_SAMPLING_FIELDS = frozenset({"logprobs", "prompt_logprobs", "output_kind", "flat_logprobs", "logprob_token_ids",
                                 "prompt_logprob_start", "prompt_logprob_token_ids"})


class VLLMEngine(VerifiedSyncEngine):
    """`RolloutEngine` on an in-process `vllm.LLM` holding its own copy of the base weights."""

    def __init__(self, model_path: str, base, dtype: str = "float32", sync_mode: str = "fold",
                 max_lora_rank: int | None = None, seed: int = 0, max_model_len: int | None = None,
                 kv_cache_gib: int | None = None, verify_tol: float | None = None,
                 probe: tuple[list[int], list[int]] | None = None, enforce_eager: bool = True,
                 kv_cache_sequences: int | None = None, kv_cache_memory_bytes: int | None = None,
                 **llm_options):
        """KV cache, first that applies: `kv_cache_gib` (whole GiB, the user's override),
        `kv_cache_memory_bytes` (exact), or sized for `kv_cache_sequences` concurrent sequences of
        `max_model_len` tokens (align.engines.kv_cache; the trainer passes its rollout's shape);
        else vLLM-CPU's VLLM_CPU_KVCACHE_SPACE (1 GiB unless set)."""
        if sync_mode not in ("lora", "fold"):
            raise ValueError(f"sync_mode: expected 'lora' or 'fold', got {sync_mode!r}")
        overrides = {}
        if kv_cache_gib is not None:
            if kv_cache_gib != int(kv_cache_gib) or kv_cache_gib < 1:
                raise ValueError(f"kv_cache_gib: expected a whole number of GiB >= 1 (vLLM-CPU reads "
                                 f"VLLM_CPU_KVCACHE_SPACE as an integer), got {kv_cache_gib!r}")
            overrides["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
        vllm_compat.import_vllm()
        import vllm

        self.model_path = str(model_path)
        self.dtype = dtype
        self.sync_mode = sync_mode
        self._init_probe(base, dtype, verify_tol, probe)
        args = dict(model=self.model_path, dtype=dtype, enforce_eager=enforce_eager, seed=seed,
                    trust_remote_code=False)
        if max_model_len is not None:
            args["max_model_len"] = max_model_len
        if kv_cache_gib is None and kv_cache_memory_bytes is None and kv_cache_sequences is not None:
            if max_model_len is None:
                raise ValueError("kv_cache_sequences: the KV cache is sized per sequence; give max_model_len too")
            from align.engines.kv_cache import kv_cache_bytes

            kv_cache_memory_bytes = kv_cache_bytes(base._plain_model().config, dtype, max_model_len,
                                                   kv_cache_sequences)
        if kv_cache_gib is None and kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        self.kv_cache_memory_bytes = args.get("kv_cache_memory_bytes")
        if sync_mode == "lora":
            rank = max_lora_rank or vllm_max_lora_rank(s.rank for s in base.settings.values())
            args.update(enable_lora=True, max_lora_rank=rank,
                        max_loras=2)  # the adapter and the all-zero stand-in for "none" in mixed batches
        args.update(llm_options)
        with vllm_compat.engine_environment(overrides) as env:
            if sync_mode == "fold" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
                raise ValueError("sync_mode='fold' edits the engine's weights in this process: it needs "
                                 "VLLM_ENABLE_V1_MULTIPROCESSING=0 (an in-process engine); use sync_mode='lora'")
            if "kv_cache_memory_bytes" in args:
                env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # on CPU it would override the argument (engines.kv_cache)
            self.llm = vllm.LLM(**args)
        self._scratch = scratch_dir()
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._scratch, True)
        # lora mode: adapter name -> (LoRARequest, its lora_int_id, its folder)
        self._loras: dict[str, tuple[object, int, Path]] = {}
        self._next_id = 1
        self._zero = ZeroAdapter.for_trainer(base) if sync_mode == "lora" else None
        self._folded: str | None = None  # fold mode: which adapter the weights currently hold
        self._layout: dict[str, list[str]] | None = None  # fold mode: engine linear -> the HF modules it stacks

    # -- sync -----------------------------------------------------------------------------------
    def _send(self, base, adapter: str | None) -> int:
        if adapter is None:  # use_peft: false: the trainer trains the base itself
            return self._sync_full(base)
        return self._sync_fold(base, adapter) if self.sync_mode == "fold" else self._sync_lora(base, adapter)

    def _engine_layout(self, model) -> dict[str, list[str]]:
        if self._layout is None:
            self._layout = fused_layout(list(vllm_compat.decoder_linears(model)), vllm_compat.packed_modules(model))
        return self._layout

    def _sync_full(self, base) -> int:
        """Every weight of the trainer's base (full fine-tuning): each decoder linear stacked and re-packed as fold
        does (vLLM-CPU keeps no plain weight there), the rest (embeddings, norms, head) through vLLM's own loader."""
        model = vllm_compat.engine_model(self.llm)
        layout = self._engine_layout(model)
        parts = [p for ps in layout.values() for p in ps]
        weights = base_linear_weights(base, parts)
        modules = dict(model.named_modules())
        for name, stacked in layout.items():
            vllm_compat.set_linear_weight(modules[name], folded_weight([weights[p] for p in stacked], stacked, {},
                                                                       DTYPES[self.dtype]))
        linear = {f"{p}.weight" for p in parts}
        rest = [(n, p.detach()) for n, p in base._plain_model().named_parameters() if n not in linear]
        vllm_compat.load_weights(model, rest)
        self._folded = None  # the engine now holds the trainer's weights themselves
        self.llm.reset_prefix_cache()
        return sum(w.nbytes for w in weights.values()) + sum(t.nbytes for _, t in rest)

    def _register(self, name: str, folder) -> None:
        # A fresh id every time: vLLM caches adapters by id, and a reused id would keep serving the old weights.
        lora_id = self._next_id
        self._next_id += 1
        self._loras[name] = (vllm_compat.lora_request(f"{name}-{lora_id}", lora_id, str(folder)), lora_id, folder)

    def _sync_lora(self, base, adapter: str) -> int:
        folder = base.save_adapter(adapter, self._scratch / f"{adapter}-{self._next_id}")
        rank = json.loads((folder / "adapter_config.json").read_text())["r"]
        limit = vllm_compat.max_lora_rank(self.llm)
        if rank > limit:
            raise ValueError(f"adapter {adapter!r} has rank {rank} > this engine's max_lora_rank {limit}; "
                             f"start the engine with max_lora_rank={vllm_max_lora_rank([rank])}")
        old = self._loras.get(adapter)
        self._register(adapter, folder)
        if old is not None:
            vllm_compat.remove_lora(self.llm, old[1])
            shutil.rmtree(old[2], ignore_errors=True)
        return folder_bytes(folder)

    def _zero_lora(self):
        """An all-zero adapter (B = 0): the base model, but servable inside a LoRA batch."""
        if ZERO_ADAPTER_NAME not in self._loras:
            self._register(ZERO_ADAPTER_NAME, self._zero.write(self._scratch / ZERO_ADAPTER_NAME))
        return self._loras[ZERO_ADAPTER_NAME][0]

    def _sync_fold(self, base, adapter: str) -> int:
        factors = lora_factors(base, adapter)
        model = vllm_compat.engine_model(self.llm)
        self._engine_layout(model)
        # The trainer's own base tensors, not a copy kept here (docs/design.md, "Rollout engines and adapter sync").
        weights = base_linear_weights(base, [p for parts in self._layout.values() for p in parts])
        modules = dict(model.named_modules())
        touched = 0
        for name, parts in self._layout.items():
            missing = [p for p in parts if p not in weights]
            if missing:
                raise AdapterSyncError(f"fold: the trainer's base has no weights {missing[:3]} for engine layer {name}")
            if not any(p in factors for p in parts) and self._folded is None:
                continue  # the engine still holds the checkpoint's weights here
            new = folded_weight([weights[p] for p in parts], parts, factors, DTYPES[self.dtype])
            vllm_compat.set_linear_weight(modules[name], new, owned=True)  # built for it alone: no copy
            del new
            touched += sum(p in factors for p in parts)
        if touched != len(factors):
            missing = sorted(set(factors) - {p for ps in self._layout.values() for p in ps})
            raise AdapterSyncError(f"fold: adapter {adapter!r} has layers the engine has no weights for: "
                                   f"{missing[:5]}")
        self._folded = adapter
        # Cached prefixes hold keys/values computed with the previous weights.
        self.llm.reset_prefix_cache()
        return sum(a.nbytes + b.nbytes for a, b, _ in factors.values())

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
        return [self._loras[a][0] if a is not None else none for a in adapters]

    def generate(self, prompt_ids, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=None,
                 adapter: AdapterArg = "policy", ignore_eos: bool = False, *, top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, generation_kwargs: dict | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_sampling(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty)
        extra = check_generation_kwargs(generation_kwargs, vllm_compat.sampling_param_names() - OWN_SAMPLING_FIELDS,
                                        "vLLM SamplingParams")
        loras = self._lora_requests(per_prompt_adapters(adapter, len(prompt_ids)))
        # logprobs=0: the sampled token's log-prob, raw (vLLM's default logprobs_mode; protocol.py's convention).
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 top_k=max(top_k, 0), min_p=min_p, repetition_penalty=repetition_penalty,
                                 logprobs=0, seed=None if seed is None else seed + i * n,
                                 ignore_eos=ignore_eos, **extra)
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
        self._finalizer()
        gc.collect()  # the engine sits in reference cycles; give its copy of the weights back now
