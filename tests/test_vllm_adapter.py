"""A trained adapter saved by SharedBase.save_adapter loads in vLLM-CPU and serves the trainer's model.

Real vLLM (CPU build, in-process), real PEFT, the tiny Llama. The adapter's B
matrices are set to random non-zero values so that it differs from the base (a
fresh adapter has B = 0 and would prove nothing).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from align.core.base import SharedBase  # noqa: E402
from align.core.lora import LoraSettings
from align.engines import trainer_logprobs  # noqa: E402


@pytest.mark.vllm
def test_saved_adapter_loads_in_vllm_and_matches_trainer(tiny_llama, tmp_path):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy", LoraSettings(rank=4, alpha=32))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.adapter_parameters("policy").items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    folder = base.save_adapter("policy", tmp_path / "policy")

    prompt = base.tokenizer("What is 3+4? Reply with the number only.", add_special_tokens=False)["input_ids"]
    completion = base.tokenizer(" The answer is 7.", add_special_tokens=False)["input_ids"]
    want_policy = trainer_logprobs(base, prompt, completion, "policy")
    want_base = trainer_logprobs(base, prompt, completion, None)
    # The adapter must really change the model, or "vLLM matches the trainer" could hold without loading it.
    assert max(abs(a - b) for a, b in zip(want_policy, want_base, strict=True)) > 0.05

    # Rank 4 is served with max_lora_rank 8: vLLM accepts only 1, 8, 16, ...
    llm = LLM(model=str(tiny_llama), dtype="float32", enable_lora=True, max_lora_rank=8,
              enforce_eager=True, seed=0)
    lora = LoRARequest("policy", 1, str(folder))
    ids = prompt + completion
    scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def vllm_logprobs(request):
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], scoring, lora_request=request, use_tqdm=False)
        return [out[0].prompt_logprobs[j][ids[j]].logprob for j in range(len(prompt), len(ids))]

    got_policy = vllm_logprobs(lora)
    got_base = vllm_logprobs(None)
    assert len(got_policy) == len(completion)
    # float32: vLLM's LoRA path equals PEFT's forward up to float rounding (measured ~1e-6).
    assert max(abs(a - b) for a, b in zip(got_policy, want_policy, strict=True)) <= 1e-4
    assert max(abs(a - b) for a, b in zip(got_base, want_base, strict=True)) <= 1e-4
    assert max(abs(a - b) for a, b in zip(got_policy, got_base, strict=True)) > 0.05

    # What vLLM generates changes too: greedy continuations with and without the adapter differ.
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    with_adapter = llm.generate([TokensPrompt(prompt_token_ids=prompt)], greedy, lora_request=lora,
                                use_tqdm=False)[0].outputs[0].token_ids
    without = llm.generate([TokensPrompt(prompt_token_ids=prompt)], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert list(with_adapter) != list(without)


@pytest.mark.vllm
def test_attention_only_and_one_layer_adapters_load_in_vllm_and_match_trainer(tiny_llama, tmp_path):
    """Placed adapters (lora_target_modules: attention; lora_layers_to_transform: 1): their folders say what
    they hold, so vLLM serves exactly the trainer's model."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    base = SharedBase.load(str(tiny_llama))
    gen = torch.Generator().manual_seed(1)
    folders = {}
    for name, lora in (("attention", LoraSettings(rank=4, targets="attention")), ("layer1", LoraSettings(layers=1))):
        base.add_adapter(name, lora)
        with torch.no_grad():
            for pname, p in base.adapter_parameters(name).items():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        folders[name] = base.save_adapter(name, tmp_path / name)
        SharedBase.load(str(tiny_llama)).check_adapter_base(folders[name], name)
    prompt = base.tokenizer("What is 3+4? Reply with the number only.", add_special_tokens=False)["input_ids"]
    completion = base.tokenizer(" The answer is 7.", add_special_tokens=False)["input_ids"]
    ids = prompt + completion
    llm = LLM(model=str(tiny_llama), dtype="float32", enable_lora=True, max_lora_rank=8, max_loras=2,
              enforce_eager=True, seed=0)
    scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    want_base = trainer_logprobs(base, prompt, completion, None)
    for i, (name, folder) in enumerate(folders.items(), start=1):
        want = trainer_logprobs(base, prompt, completion, name)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], scoring, lora_request=LoRARequest(name, i, str(folder)),
                           use_tqdm=False)
        got = [out[0].prompt_logprobs[j][ids[j]].logprob for j in range(len(prompt), len(ids))]
        assert max(abs(a - b) for a, b in zip(want, want_base, strict=True)) > 0.05, name  # the adapter matters
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4, name
