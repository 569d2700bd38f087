"""One frozen base, many adapters: coverage, reference = adapters off, one copy of the weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from align.core.base import SharedBase
from align.core.logprobs import completion_logprobs
from align.core.lora import LoraSettings


def _lora_layer_names(model: nn.Module, adapter: str) -> set[str]:
    """Modules that hold a LoRA A matrix for `adapter` (PEFT puts them in `lora_A[adapter]`)."""
    return {name for name, m in model.named_modules()
            if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})}


def test_all_linear_layers_and_fused_experts_carry_lora(tiny_models):
    for arch, path in tiny_models.items():
        base = SharedBase.load(str(path))
        plain = {n: m for n, m in base.model.named_modules()}
        # Every nn.Linear inside a block, found independently of align.core.lora.lora_targets.
        linears = {n for n, m in plain.items() if isinstance(m, nn.Linear) and ".layers." in n}
        # Routers: the MoE block's other child with weights (TopKRouter here, nn.Linear in older versions).
        routers = {n for n, m in plain.items() if not n.endswith(".experts") and ".layers." in n
                   and hasattr(plain.get(n.rpartition(".")[0]), "experts") and list(m.parameters(recurse=False))}
        experts = {n for n, m in plain.items() if n.endswith(".experts")}
        base.add_adapter("policy")
        lora = _lora_layer_names(base.model, "policy")
        wrapped = {n.removeprefix("base_model.model.") for n in lora}
        missing = {n for n in linears - routers if n not in wrapped}
        assert not missing, f"{arch}: linears without LoRA: {sorted(missing)}"
        for r in routers:
            assert not any(w.startswith(r) for w in wrapped), f"{arch}: router {r} got LoRA"
        assert not any("embed" in w or "lm_head" in w for w in wrapped)
        if arch == "llama":
            assert not experts and len(wrapped) == 2 * 7  # 2 blocks x q,k,v,o,gate,up,down
        else:
            # Both fused 3-D expert tensors of every MoE block carry an adapter (PEFT nests one
            # ParamWrapper per targeted parameter).
            targeted = {getattr(m, "parameter_name", None) for n, m in base.model.named_modules()
                        if n.rpartition(".")[0].endswith("experts") or n.endswith("experts")}
            assert {"gate_up_proj", "down_proj"} <= targeted, f"{arch}: {targeted}"
            assert len(routers) == 2
        # The router, embeddings and lm_head stay frozen; only LoRA tensors train.
        trainable = [n for n, p in base.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_reference_is_the_plain_base_and_no_second_copy(tiny_llama):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    base = SharedBase.load(str(tiny_llama))
    bytes_before = base.base_bytes()
    base.add_adapter("policy")
    base.add_adapter("critic")
    # Make the adapters non-trivial so that "adapter on" differs from the base.
    with torch.no_grad():
        for p in base.adapter_parameters("policy").values():
            p.normal_(0, 0.2)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    mask = torch.ones_like(ids)
    comp = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with base.reference():
        ref = completion_logprobs(base, ids, mask, comp)
    with base.adapter("policy"):
        pol = completion_logprobs(base, ids, mask, comp)
    logits = plain(input_ids=ids).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * comp[:, 1:]
    assert torch.equal(ref, expected) or (ref - expected).abs().max() < 1e-6
    assert (pol - expected).abs().max() > 1e-3  # the policy adapter really changes the model
    # One copy of the base weights: three roles, the bytes of one plain model.
    plain_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                       for p in plain.parameters()}.values())
    assert base.base_bytes() == bytes_before == plain_bytes


def test_switching_adapters_keeps_each_output(tiny_llama):
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("first", LoraSettings(rank=4))
    base.add_adapter("second")
    with torch.no_grad():
        for i, name in enumerate(("first", "second")):
            g = torch.Generator().manual_seed(i)
            for p in base.adapter_parameters(name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    mask = torch.ones_like(ids)
    with base.adapter("first"):
        ha = base.hidden(ids, mask)
    with base.adapter("second"):
        hb = base.hidden(ids, mask)
    with base.adapter("first"):
        ha2 = base.hidden(ids, mask)
    assert not torch.allclose(ha, hb)
    assert torch.equal(ha, ha2)
    # Both adapters stay trainable after switching (PEFT alone would freeze the inactive one).
    assert all(p.requires_grad for p in base.adapter_parameters("first").values())
    assert all(p.requires_grad for p in base.adapter_parameters("second").values())


def test_left_and_right_padding_give_the_same_logprobs(tiny_llama):
    base = SharedBase.load(str(tiny_llama))
    seq = [5, 17, 42, 99, 7, 3]
    right = torch.tensor([seq + [0, 0]])
    left = torch.tensor([[0, 0] + seq])
    rm = torch.tensor([[1] * 6 + [0, 0]])
    lm = torch.tensor([[0, 0] + [1] * 6])
    rc = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]])
    lc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    r = completion_logprobs(base, right, rm, rc)
    lp = completion_logprobs(base, left, lm, lc)
    assert (r[rc[:, 1:].bool()] - lp[lc[:, 1:].bool()]).abs().max() < 1e-5


def test_loading_a_frozen_adapter_keeps_train_mode(tiny_llama, tmp_path):
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy")
    base.save_adapter("policy", tmp_path / "saved")
    base.model.train()
    base.load_adapter("frozen", tmp_path / "saved")  # PEFT alone would switch the model to eval
    assert base.model.training


def test_resolve_model_kinds(tmp_path, monkeypatch):
    from align.core.errors import UserError
    from align.core.loading import resolve_model
    from align.core.smollm import MODEL_DIRNAME

    # 'smollm2' -> the cached conversion (a stand-in here, so nothing is downloaded).
    cached = tmp_path / "models" / MODEL_DIRNAME
    cached.mkdir(parents=True)
    (cached / "model.safetensors").touch()
    (cached / "config.json").touch()
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    assert resolve_model("smollm2") == str(cached)
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # an existing folder: itself
    for hub_id in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/model.v1_2"):
        assert resolve_model(hub_id) == hub_id  # left for transformers to resolve
    for bad in (str(tmp_path / "missing"), "./missing", "a/b/c", "org/../x", ""):
        with pytest.raises(UserError, match="neither 'smollm2', an existing model folder, nor a hub id"):
            resolve_model(bad)
