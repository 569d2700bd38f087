"""How much of the demo task a base keeps when its linear layers go to NF4, and what gets it back.

    python scripts/bench/nf4_sensitivity.py            # SmolLM2-135M (offline), ~3 minutes on 2 cores
    python scripts/bench/nf4_sensitivity.py --quick    # tiny random model: the plumbing only

The held-out greedy reward of the bare base (no training) on the `align demo` task (100 held-out
prompts, the transformers engine), for:
- bf16: every weight in bfloat16 (the QLoRA bench's full-precision side);
- nf4: the decoder's linear layers in NF4 with double quantisation (`load_in_4bit: true`);
- nf4_first_half_bf16 / nf4_second_half_bf16: NF4 with the first / second half of the decoder
  layers kept in bfloat16 (transformers' `llm_int8_skip_modules`): is the damage in a few layers?
- nf4_svd_rank8 (--rank): NF4 plus, per layer, the best rank-8 correction of its rounding error W - Q(W)
  (an SVD; LoftQ's one-step initialisation), held in a LoRA adapter of the rank the recipes train.
Also the rounding error itself, ||W - Q(W)|| / ||W|| averaged over the linear layers, beside NF4's
error on Gaussian weights of the same spread. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import measure  # noqa: F401 - first: the repository root on sys.path (see measure.py)
import torch


def load(model_path: str, four_bit: bool, skip_layers=()):
    """The base as the recipes hold it, optionally with some decoder layers left unquantised."""
    from transformers import AutoModelForCausalLM

    from align.core.base import SharedBase
    from align.core.loading import FourBit, load_tokenizer

    kwargs = {}
    if four_bit:
        config = FourBit().bnb_config()
        # Anchored patterns: "model.layers.1" alone would also match layers 10-19.
        config.llm_int8_skip_modules = ["lm_head"] + [rf"model\.layers\.{i}\." for i in skip_layers]
        kwargs = {"quantization_config": config, "device_map": {"": "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, use_safetensors=True, **kwargs)
    return SharedBase(model, load_tokenizer(model_path), model_path)


def quantised_layers(base, adapter: str):
    """(checkpoint key, PEFT layer) for every 4-bit linear layer carrying `adapter`."""
    for name, module in base.model.named_modules():
        base_layer = getattr(module, "base_layer", None)
        if base_layer is None or adapter not in getattr(module, "lora_A", {}):
            continue
        if getattr(base_layer.weight, "quant_state", None) is None:
            continue
        yield name.split("base_model.model.", 1)[1] + ".weight", module


@torch.no_grad()
def add_svd_correction(base, model_path: str, rank: int) -> tuple[list[float], list[float]]:
    """Adapter "svd" = rank-`rank` SVD of each layer's rounding error.

    Returns each layer's relative error ||W - Q(W)|| / ||W|| without and with the correction.

    Q(W) is read back through the layer's own forward on the identity, not bitsandbytes'
    dequantize: the CPU backend repacks the 4-bit data on its first forward, after which
    dequantize_4bit on the stored bytes no longer returns Q(W).
    """
    from safetensors import safe_open

    from align.core.lora import LoraSettings

    base.add_adapter("svd", LoraSettings(rank=rank, alpha=4 * rank), trainable=False)
    before, after = [], []
    with safe_open(str(Path(model_path) / "model.safetensors"), "pt") as f:
        for key, layer in quantised_layers(base, "svd"):
            w = f.get_tensor(key).float()
            q = layer.base_layer(torch.eye(w.shape[1], dtype=torch.bfloat16)).float().T
            residual = w - q
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            root = (s[:rank] / layer.scaling["svd"]).sqrt()  # B @ A * scaling = the rank-r part of W - Q(W)
            layer.lora_B["svd"].weight.copy_(u[:, :rank] * root)
            layer.lora_A["svd"].weight.copy_(root[:, None] * vh[:rank])
            before.append((residual.norm() / w.norm()).item())
            after.append((s[rank:].square().sum().sqrt() / w.norm()).item())  # what the rank-r part leaves
    return before, after


def gaussian_nf4_error(shape=(576, 576)) -> float:
    import bitsandbytes as bnb

    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(g, blocksize=64, quant_type="nf4")
    return ((g - bnb.functional.dequantize_4bit(packed, state).float()).norm() / g.norm()).item()


def score(base, model_path: str, rows, adapter=None, max_new_tokens: int = 16) -> float:
    from align.engines import make_engine
    from align.recipes.demo import evaluate

    if not base.adapters:
        base.add_adapter("policy")  # the transformers engine drives a PEFT model
    value, _ = evaluate(make_engine("hf", model_path, base), base, rows, adapter, max_new_tokens)
    return round(value, 4)


def main() -> None:
    from transformers import AutoConfig

    from align.core.loading import resolve_model
    from align.recipes.demo import DemoSettings, demo_prompts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random model, 8 prompts")
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--rank", type=int, default=8, help="rank of the SVD correction (the recipes' lora_r)")
    args = p.parse_args()
    if args.quick:
        from align.core.tiny import build_tiny_model

        model_path, args.eval_prompts = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama")), 8
    else:
        model_path = resolve_model("smollm2")
    _, rows = demo_prompts(DemoSettings(eval_prompts=args.eval_prompts))
    layers = AutoConfig.from_pretrained(model_path).num_hidden_layers
    half = layers // 2
    out = {"model": "tiny" if args.quick else "SmolLM2-135M-Instruct", "eval_prompts": len(rows), "rank": args.rank}
    for name, four_bit, skip in (("bf16", False, ()), ("nf4", True, ()),
                                 ("nf4_first_half_bf16", True, range(half)),
                                 ("nf4_second_half_bf16", True, range(half, layers))):
        out[name] = score(load(model_path, four_bit, skip), model_path, rows)
        print(f"[nf4] {name}: {out[name]}", file=sys.stderr, flush=True)
        gc.collect()
    base = load(model_path, True)
    before, after = add_svd_correction(base, model_path, args.rank)
    out[f"nf4_svd_rank{args.rank}"] = score(base, model_path, rows, "svd")
    out["nf4_weight_rel_error"] = round(statistics.fmean(before), 4)
    out[f"nf4_svd_rank{args.rank}_weight_rel_error"] = round(statistics.fmean(after), 4)
    out["nf4_gaussian_rel_error"] = round(gaussian_nf4_error(), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
