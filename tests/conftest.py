"""Shared fixtures: tiny real models built once per session, and vLLM settings for CPU tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: set before align is
# `dtype: auto` is bfloat16 where the CPU computes it natively: pinned to float32 so that tests comparing numbers
# exactly mean the same on CPUs with and without AMX/AVX512_BF16 (subprocesses inherit it).
os.environ["ALIGN_AUTO_DTYPE"] = "float32"

from align.engines.vllm_compat import cpu_environment  # noqa: E402

# vLLM on CPU: in-process engine (2 s start instead of 14 s), small KV cache, no reserved core.
cpu_environment(os.environ)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on two workers (scripts/test.sh): one compute thread each, and in the processes
    # their tests start, so two workers share two cores instead of four threads fighting over them.
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Path to a tiny Llama-shaped causal LM + BPE tokenizer with a chat template."""
    from align.core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny Llama, Qwen3-MoE and Mixtral models, keyed by architecture."""
    from align.core.tiny import build_tiny_model

    return {arch: build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
            for arch in ("llama", "qwen3_moe", "mixtral")}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A private, empty, offline datasets cache (in this process and in subprocesses)."""
    import datasets

    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


# The directly built classifier's own template: scoring with the policy's template would read other tokens.
OWN_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="session")
def own_classifier(tiny_llama, tmp_path_factory):
    """A sequence classifier (TRL's reward_model_name_or_path) built with transformers alone, with a chat
    template of its own, saved as `my-rm`."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_llama, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores of order 1, so rows differ clearly
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = OWN_TEMPLATE
    model.config.pad_token_id = tok.pad_token_id
    path = tmp_path_factory.mktemp("own") / "my-rm"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
