"""Rollout throughput and adapter-sync cost: vLLM LoRA path vs vLLM fold path vs transformers+PEFT.

    python scripts/bench/rollout.py            # SmolLM2-135M-Instruct, 64 prompts x 48 new tokens (~minutes, 2 cores)
    python scripts/bench/rollout.py --quick    # tiny model, seconds
    python scripts/bench/rollout.py --dtypes bfloat16 --engines fold

Target (SmolLM2, 2 cores): rollout_tok_per_s_vllm >= 300. The workload is fixed: every prompt gets
exactly --new-tokens tokens (EOS ignored, as vLLM's own throughput benchmark does), so engines are
compared on the same token count; the same figure with sampling stopping at EOS (fewer tokens, a
shrinking batch) is reported as *_natural. Figures are medians of warm repeats; the load average is
printed next to them because the cores are shared. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from measure import bench_environment

# Both cores for vLLM's OpenMP pool, also where ppo.py loads this file for `measure`.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def perturb(base, std: float, seed: int = 0) -> None:
    """A trained-looking adapter: small random B (a fresh one has B = 0, i.e. the base)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.adapter_parameters("policy").items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def measure(engine, base, prompts, new_tokens: int, repeats: int, syncs: int, std: float) -> dict:
    """Sync `syncs` times (after a fresh `perturb` of B with `std` each), then time generation."""
    sync = []
    for i in range(syncs):  # each sync after a real change, as in training (the probe must follow it)
        perturb(base, std=std, seed=i)
        sync.append(engine.sync(base, "policy"))
    engine.generate(prompts[:8], max_new_tokens=4, seed=0)  # warm-up: first-call costs out of the timing
    result = {"sync_bytes": sync[-1].bytes, "sync_seconds": statistics.median(s.seconds for s in sync[1:] or sync),
              "max_abs_diff": max(s.max_abs_diff or 0.0 for s in sync)}
    for label, ignore_eos in (("tok_per_s", True), ("tok_per_s_natural", False)):
        rates = []
        for r in range(repeats):
            t0 = time.perf_counter()
            out = engine.generate(prompts, n=1, max_new_tokens=new_tokens, temperature=1.0, seed=r,
                                  ignore_eos=ignore_eos)
            seconds = time.perf_counter() - t0
            tokens = sum(len(s.completion_ids) for samples in out for s in samples)
            rates.append(tokens / seconds)
            print(f"    {label} repeat {r}: {tokens} tokens in {seconds:.2f}s = {tokens / seconds:.1f} tok/s "
                  f"(load {load_avg()})", flush=True)
        result[label] = statistics.median(rates)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model (a smoke test of the path)")
    ap.add_argument("--engines", default="hf,lora,fold", help="comma list of: hf, lora, fold")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="vLLM engine dtypes, comma list (float32: probe-exact; bfloat16: AMX where the CPU has it)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="warm repeats per engine (median reported)")
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    bench_environment(vllm=True)  # in-process engine, small KV cache, no core reserved

    import torch

    from align.core.base import SharedBase
    from align.core.lora import LoraSettings
    from align.engines import make_engine
    from align.tasks.arithmetic import make_prompts

    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        from align.core.tiny import build_tiny_model

        model_path = build_tiny_model(Path(tmp.name) / "tiny", "llama")
        args.prompts, args.new_tokens = min(args.prompts, 16), min(args.new_tokens, 16)
    else:
        from align.core.smollm import ensure_smollm2

        model_path = ensure_smollm2()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"hf", "lora", "fold"}
    if unknown:
        ap.error(f"--engines: unknown {sorted(unknown)}; expected hf, lora, fold")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if set(dtypes) - {"float32", "bfloat16"}:
        ap.error(f"--dtypes: expected float32 and/or bfloat16, got {dtypes}")
    # (label, sync mode or "hf", vLLM dtype): the HF engine runs on the float32 trainer base.
    runs = [(name, name, "float32") if name == "hf" else (f"{name}_{d}", name, d) for name in engines
            for d in (["float32"] if name == "hf" else dtypes)]

    base = SharedBase.load(str(model_path), dtype="float32")
    base.add_adapter("policy", LoraSettings(rank=args.rank))
    std = 0.3 if args.quick else 1e-3
    tok = base.tokenizer
    rows = make_prompts(args.prompts, seed=0)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for r in rows]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    print(f"model {model_path} | {len(prompts)} prompts x {args.new_tokens} new tokens | vLLM dtypes {dtypes} "
          f"| adapter rank {args.rank} | load {load_avg()}", flush=True)

    results = {}
    for name, mode, dtype in runs:  # HF first: an in-process vLLM engine lowers torch's thread count
        print(f"[{name}]", flush=True)
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        if mode == "hf":
            engine = make_engine("hf", str(model_path), base)
        else:
            engine = make_engine("vllm", str(model_path), base, dtype=dtype, sync_mode=mode)
        start_s = time.perf_counter() - t0
        results[name] = measure(engine, base, prompts, args.new_tokens, args.repeats,
                                syncs=1 if name == "hf" else 3, std=std)
        results[name]["start_seconds"] = start_s
        engine.close()
        print(f"  {name}: {results[name]['tok_per_s']:.1f} tok/s, sync {results[name]['sync_bytes']} bytes in "
              f"{results[name]['sync_seconds']:.3f}s, probe max |diff| {results[name]['max_abs_diff']:.2e}",
              flush=True)

    full = base.base_bytes()
    vllm_runs = [name for name, mode, _ in runs if mode != "hf"]
    vllm_best = max((results[m]["tok_per_s"], m) for m in vllm_runs) if vllm_runs else (None, None)
    summary = {
        "model": "tiny-llama" if args.quick else "SmolLM2-135M-Instruct",
        "prompts": len(prompts), "new_tokens": args.new_tokens, "repeats": args.repeats,
        "rollout_tok_per_s_vllm": vllm_best[0], "rollout_vllm_best": vllm_best[1],
        "target_rollout_tok_per_s_vllm": 300,
        "full_weight_bytes": full, "load_avg_end": load_avg(),
    }
    for name, r in results.items():
        summary[f"rollout_tok_per_s_{name}"] = round(r["tok_per_s"], 1)
        summary[f"rollout_tok_per_s_{name}_natural"] = round(r["tok_per_s_natural"], 1)
        summary[f"sync_bytes_{name}"] = r["sync_bytes"]
        summary[f"sync_seconds_{name}"] = round(r["sync_seconds"], 4)
        summary[f"max_abs_logprob_diff_{name}"] = r["max_abs_diff"]
        summary[f"engine_start_seconds_{name}"] = round(r["start_seconds"], 1)
    for d in dtypes:
        if f"fold_{d}" in results and f"lora_{d}" in results:
            summary[f"fold_over_lora_{d}"] = round(results[f"fold_{d}"]["tok_per_s"] / results[f"lora_{d}"]["tok_per_s"], 2)
    if "hf" in results and vllm_best[0]:
        summary["vllm_over_hf"] = round(vllm_best[0] / results["hf"]["tok_per_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
