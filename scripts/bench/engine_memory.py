"""The in-process vLLM engine's memory (RSS before/after it starts) and its sync probe's drift, per dtype.

    python scripts/bench/engine_memory.py                          # SmolLM2-135M, float32 and bfloat16
    python scripts/bench/engine_memory.py --quick                  # tiny model, seconds
    python scripts/bench/engine_memory.py --variants trainer,seqs16

Each (dtype, variant) runs in its own process: modules imported, then the trainer's base loaded in
`dtype` (RSS `base`), then a fold-mode VLLMEngine in the same dtype as the GRPO demo's trainer builds
it (max_model_len 144, KV cache for 16 sequences; RSS `engine`), then one rollout of 16 sequences
(RSS `rollout`). engine_runtime_mb = rollout - base: the engine's weights, KV cache and vLLM's own
buffers. Then --syncs adapter syncs, each after a fresh random B of std --std (a trained-looking
adapter), with the probe's max |engine - trainer| log-prob difference of each (tolerance: none, so
every difference is reported). Variants: trainer (the options above), seqs16 (also
max_num_seqs=16: vLLM sizes its sampler and warm-up batches by it, 256 by default on CPU).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import tempfile
from pathlib import Path

from measure import bench_environment, run_child

VARIANTS = {"trainer": {}, "seqs16": {"max_num_seqs": 16}}


def rss_mb() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed loading buffers back first: what stays is counted
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(model: str, dtype: str, variant: str, syncs: int, std: float) -> dict:
    import importlib.util

    import peft  # noqa: F401
    import transformers  # noqa: F401

    from align.core.base import SharedBase
    from align.engines import make_engine, vllm_compat
    from align.tasks.arithmetic import make_prompts

    spec = importlib.util.spec_from_file_location("bench_rollout", Path(__file__).with_name("rollout.py"))
    rollout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rollout)
    vllm_compat.import_vllm()
    start = rss_mb()
    base = SharedBase.load(model, dtype=dtype, device="cpu")
    base.add_adapter("policy")
    loaded = rss_mb()
    engine = make_engine("vllm", model, base, dtype=dtype, max_model_len=144, kv_cache_sequences=16,
                         verify_tol=float("inf"), **VARIANTS[variant])
    started = rss_mb()
    tok = base.tokenizer
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)) for r in make_prompts(2, 0)]
    engine.generate(prompts, n=8, max_new_tokens=16, temperature=1.0, seed=0, adapter=None)
    rolled = rss_mb()
    diffs = []
    for i in range(syncs):
        rollout.perturb(base, std=std, seed=i)
        diffs.append(engine.sync(base, "policy").max_abs_diff)
    engine.close()
    return {"dtype": dtype, "variant": variant, "rss_modules_mb": round(start, 1), "base_mb": round(loaded - start, 1),
            "engine_start_mb": round(started - loaded, 1), "engine_runtime_mb": round(rolled - loaded, 1),
            "probe_max_abs_diffs": [round(d, 5) for d in diffs], "probe_max_abs_diff": round(max(diffs), 5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model instead of SmolLM2-135M")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--variants", default="trainer,seqs16", help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--syncs", type=int, default=5)
    p.add_argument("--std", type=float, default=2e-3, help="std of each sync's random lora_B")
    p.add_argument("--child", nargs=5, metavar=("MODEL", "DTYPE", "VARIANT", "SYNCS", "STD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model, dtype, variant, syncs, std = args.child
        print(json.dumps(child(model, dtype, variant, int(syncs), float(std))))
        return
    bench_environment(vllm=True)
    if args.quick:
        from align.core.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-engine-")) / "tiny"))
    else:
        from align.core.smollm import ensure_smollm2

        model = str(ensure_smollm2())
    rows = []
    for dtype in args.dtypes.split(","):
        for variant in args.variants.split(","):
            rows.append(run_child(__file__, "--child", model, dtype, variant, str(args.syncs), str(args.std)))
            print(f"  {rows[-1]}", flush=True)
    print(json.dumps({"model": Path(model).name, "rows": rows}))


if __name__ == "__main__":
    main()
