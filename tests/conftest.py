"""Shared fixtures: tiny real models built once per session, and vLLM settings for CPU tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: set before align is

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
