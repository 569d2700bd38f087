"""QLoRA: DPO on a 4-bit (NF4, double-quantised) base vs the same DPO on a bf16 base.

    python scripts/bench/qlora.py                 # SmolLM2-135M (offline); slow on a CPU without bf16 units
    python scripts/bench/qlora.py --quick         # tiny random model, synthetic pairs: the plumbing only

Figures (targets in brackets):
- linear_mb_4bit / linear_mb_bf16 [<= 0.30]: bytes of the decoder's linear weights, the 4-bit side
  counted with its quantisation state (per-block scales and their second-level scales);
- base_mb_4bit / base_mb_bf16: every base weight (embeddings and norms stay bf16; SmolLM2's 28M-param
  tied embedding is a fifth of the model, hence ~0.4 rather than ~0.3);
- gain_4bit [>= +0.10]: the `align demo` task (configs/dpo_smollm2.yaml, align/recipes/demo.py): held-out greedy
  arithmetic reward after minus before DPO, both measured on the 4-bit base (before: adapter off);
- steps_per_s_4bit / steps_per_s_bf16: DPO step speed (median step time), same pairs and batch.
Pairs: --pairs FILE (e.g. runs/demo/pairs.jsonl from `align demo`), else sampled from the base as the
demo does (--pairs-from). Why a 4-bit SmolLM2 gains little: scripts/bench/nf4_sensitivity.py.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import measure  # noqa: F401 - first: the repository root on sys.path (see measure.py)
import torch


def linear_bytes(base) -> int:
    """Bytes of the decoder's linear weights as stored: 4-bit ones with their quantisation state."""
    total = 0
    for name, m in base.model.named_modules():
        if ".layers." not in name or "lora_" in name or not isinstance(m, torch.nn.Linear):
            continue
        w = m.weight
        total += w.numel() * w.element_size()
        state = getattr(w, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def load(model_path: str, four_bit, compute_dtype: str):
    from align.core.base import SharedBase
    from align.core.loading import FourBit

    q = FourBit(bnb_4bit_compute_dtype=compute_dtype) if four_bit else None
    return SharedBase.load(model_path, dtype="bfloat16", load_in_4bit=q)


def make_pairs(args, model_path: str, out: Path) -> Path:
    from align.core.base import SharedBase
    from align.data.prompts import encode_prompts
    from align.engines import make_engine
    from align.recipes.demo import DemoSettings, build_pairs, demo_prompts
    from align.tasks import arithmetic

    path = out / "pairs.jsonl"
    if args.quick:
        pairs = arithmetic.preference_pairs(args.train_prompts, seed=0)
    else:
        s = DemoSettings(train_prompts=args.train_prompts, eval_prompts=args.eval_prompts)
        # --pairs-from 4bit: on-policy for QLoRA, the quantised base's own answers (transformers generates);
        # base: the unquantised base's, as `align demo` samples them (vLLM when installed).
        four_bit = args.pairs_from in ("4bit", "4bit-gold")
        base = load(model_path, True, args.compute_dtype) if four_bit else SharedBase.load(model_path)
        base.add_adapter("policy")
        engine = make_engine("hf" if four_bit else "auto", model_path, base, seed=0)
        rows, _ = demo_prompts(s)
        samples = engine.generate(encode_prompts(base.tokenizer, rows), n=s.samples_per_prompt,
                                  max_new_tokens=s.max_new_tokens, temperature=s.temperature, adapter=None)
        pairs, _ = build_pairs(rows, samples, gold=args.pairs_from == "4bit-gold")
        engine.close()
        del base, engine
        gc.collect()
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def run_variant(args, model_path: str, pairs: Path, out: Path, four_bit: bool) -> dict:
    from align.engines import make_engine
    from align.recipes.demo import DemoSettings, demo_prompts, evaluate
    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train.config_parser import load_config

    s = DemoSettings(train_prompts=args.train_prompts, eval_prompts=args.eval_prompts)
    base = load(model_path, four_bit, args.compute_dtype)
    sizes = {"linear_mb": linear_bytes(base) / 2**20, "base_mb": base.base_bytes() / 2**20}
    sets = [f"model_name_or_path={model_path}", f"train_file={pairs}", f"output_dir={out}", "max_length=128",
            f"learning_rate={s.learning_rate}", f"beta={s.beta}", f"num_train_epochs={s.epochs}",
            f"per_device_train_batch_size={s.batch_size}", f"per_device_eval_batch_size={s.batch_size}",
            "seed=0", "save_steps=0", "precompute_ref_log_probs=true", "report_to=[none]", "dtype=bfloat16",
            "chat_template=true",  # as the demo: the answers were sampled after the chat template's prompt
            f"load_in_4bit={str(four_bit).lower()}", f"bnb_4bit_compute_dtype={args.compute_dtype}"]
    if args.max_steps:
        sets.append(f"max_steps={args.max_steps}")
    sets += args.set
    trainer = DPOTrainer(load_config(DPOConfig, None, sets), base=base, overwrite=True)
    trainer.setup()
    _, eval_rows = demo_prompts(s)
    engine = make_engine("hf", model_path, base)
    before, _ = evaluate(engine, base, eval_rows, None, s.max_new_tokens)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    after, _ = evaluate(engine, base, eval_rows, "policy", s.max_new_tokens)
    steps = [json.loads(line).get("step_s") for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [t for t in steps if t]
    trainer.close()
    return {**{k: round(v, 2) for k, v in sizes.items()}, "before": round(before, 4), "after": round(after, 4),
            "gain": round(after - before, 4), "steps": len(steps), "train_s": round(train_s, 1),
            "steps_per_s": round(1 / statistics.median(steps), 4) if steps else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random model, synthetic pairs")
    p.add_argument("--pairs", default=None, help="preference JSONL to train on (default: sampled like the demo)")
    p.add_argument("--train-prompts", type=int, default=300)
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=0, help="stop DPO after this many steps (0: one epoch)")
    p.add_argument("--compute-dtype", default="bfloat16", help="bnb_4bit_compute_dtype (bfloat16 or float32)")
    p.add_argument("--memory-only", action="store_true", help="only the byte counts (seconds): no DPO, no demo")
    p.add_argument("--variants", default="4bit,bf16", help="which bases to train: 4bit, bf16 or both")
    p.add_argument("--out", default=None)
    p.add_argument("--pairs-from", choices=("base", "4bit", "4bit-gold"), default="base",
                   help="sample the DPO pairs from the unquantised base (as align demo) or from the 4-bit one; "
                        "4bit-gold: the 4-bit base's worst answer against the task's reference answer")
    p.add_argument("--set", action="append", default=[], help="DPO config override KEY=VALUE (both variants)")
    args = p.parse_args()
    if args.quick:
        args.train_prompts, args.eval_prompts, args.max_steps = 32, 8, args.max_steps or 3
    from align.core.loading import resolve_model

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-qlora-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from align.core.tiny import build_tiny_model

        model_path = str(build_tiny_model(out / "tiny", "llama"))
    else:
        model_path = resolve_model("smollm2")
    if args.memory_only:
        sizes = {}
        for name, four_bit in (("4bit", True), ("bf16", False)):
            base = load(model_path, four_bit, args.compute_dtype)
            sizes[name] = (linear_bytes(base) / 2**20, base.base_bytes() / 2**20)
            del base
            gc.collect()
        (l4, b4), (l16, b16) = sizes["4bit"], sizes["bf16"]
        print(json.dumps({"model": "tiny" if args.quick else "SmolLM2-135M-Instruct", "linear_mb_4bit": round(l4, 2),
                          "linear_mb_bf16": round(l16, 2), "linear_ratio": round(l4 / l16, 4),
                          "linear_ratio_target": 0.30, "base_mb_4bit": round(b4, 2), "base_mb_bf16": round(b16, 2),
                          "base_ratio": round(b4 / b16, 4), "gain_4bit": "not measured (--memory-only)"}))
        return
    pairs = Path(args.pairs) if args.pairs else make_pairs(args, model_path, out)
    results = {}
    for name, four_bit in (("4bit", True), ("bf16", False)):
        if name not in args.variants.split(","):
            continue
        results[name] = run_variant(args, model_path, pairs, out / f"dpo-{name}", four_bit)
        print(f"[qlora] {name}: {results[name]}", file=sys.stderr, flush=True)
        gc.collect()
    q, b = results.get("4bit", {}), results.get("bf16", {})

    def ratio(key: str, nd: int = 4):
        return round(q[key] / b[key], nd) if q.get(key) and b.get(key) else None

    summary = {
        "model": "tiny" if args.quick else "SmolLM2-135M-Instruct", "compute_dtype": args.compute_dtype,
        "pairs": sum(1 for _ in open(pairs)), "eval_prompts": args.eval_prompts, "variants": sorted(results),
        "linear_mb_4bit": q.get("linear_mb"), "linear_mb_bf16": b.get("linear_mb"),
        "linear_ratio": ratio("linear_mb"), "linear_ratio_target": 0.30,
        "base_mb_4bit": q.get("base_mb"), "base_mb_bf16": b.get("base_mb"), "base_ratio": ratio("base_mb"),
        "gain_4bit": q.get("gain"), "gain_4bit_target": 0.10, "before_4bit": q.get("before"),
        "after_4bit": q.get("after"), "gain_bf16": b.get("gain"), "steps_per_s_4bit": q.get("steps_per_s"),
        "steps_per_s_bf16": b.get("steps_per_s"), "steps_ratio": ratio("steps_per_s", 3), "steps": q.get("steps"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
