"""`align serve`: a base model and its LoRA adapters behind vLLM's OpenAI-compatible API.

    align serve --base BASE --adapter policy=runs/dpo/adapter [--adapter_dir runs/] [--port 8000]

Once ready it prints its URL, the model names it serves, and a `curl` and an `openai` call to copy.
vLLM runs as a child on a private unix socket; a small proxy (align/serve/proxy.py) in this process
is what clients reach. Heavy imports happen in `run`, so building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import os

from align.serve.client_examples import API_KEY_ENV

LOOPBACK = ("127.", "::1", "localhost")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="Base model folder (safetensors) the adapters were trained on.")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="An adapter to serve under NAME (repeatable). Clients ask for it as `model`.")
    p.add_argument("--adapter_dir", "--adapter-dir", default=None,
                   help="Allow loading/unloading adapters at run time (POST /v1/load_lora_adapter, "
                        "/v1/unload_lora_adapter), from folders inside this one only.")
    p.add_argument("--name", default=None, help="Model name of the base for clients (default: the base folder's name).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default loopback only).")
    p.add_argument("--port", type=int, default=8000, help="Port to bind; 0 picks a free one (printed).")
    p.add_argument("--api_key", "--api-key", default=None,
                   help=f"Require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set). Prefer the "
                        "environment variable: a command-line key is visible to other users in `ps`.")
    p.add_argument("--dtype", default="auto", help="vLLM --dtype (auto downcasts float32 bases; float32 for exact log-probs).")
    p.add_argument("--max_lora_rank", "--max-lora-rank", type=int, default=None,
                   help="Default: the smallest rank vLLM accepts (1, 8, 16, 32, ...) that holds every adapter "
                        "given or found in --adapter_dir.")
    p.add_argument("--max_loras", "--max-loras", type=int, default=None,
                   help="Adapters in one batch (default: all startup adapters plus the zero adapter, "
                        "+2 with --adapter_dir). More adapters still work, swapped in turn.")
    p.add_argument("--no_zero_adapter", "--no-zero-adapter", action="store_true",
                   help="Send base-model requests to vLLM without an adapter. Faster, but on vLLM-CPU a batch "
                        "mixing base and adapter requests gives wrong log-probs for the base ones "
                        "(docs/design.md, 'vLLM on CPU').")
    p.add_argument("--max_model_len", "--max-model-len", type=int, default=None,
                   help="Longest sequence (prompt + answer) in tokens (default: the model's max_position_embeddings).")
    p.add_argument("--max_num_seqs", "--max-num-seqs", type=int, default=16,
                   help="Sequences vLLM runs at once; the KV cache is sized to hold this many of --max_model_len.")
    p.add_argument("--kv_cache_gib", "--kv-cache-gib", type=float, default=None,
                   help="KV cache size in GiB, instead of the size derived from the model, --max_model_len and "
                        "--max_num_seqs.")
    p.add_argument("--max_adapter_mib", "--max-adapter-mib", type=int, default=2048,
                   help="Largest adapter_model.safetensors accepted (adapters are copied into the server's "
                        "private folder before vLLM loads them).")
    p.add_argument("--start_timeout", "--start-timeout", type=float, default=600.0, help="Seconds to wait for vLLM to become healthy.")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="After `--`: extra arguments passed to vLLM as is (e.g. -- --enforce-eager --seed 1).")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    from align.core.errors import UserError

    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or "/" in name:
            raise UserError(f"--adapter {spec!r}: expected NAME=PATH, NAME without '/'")
        if name in adapters:
            raise UserError(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def run(args: argparse.Namespace) -> int:
    from align.serve.server import serve

    extra = list(args.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return serve(base=args.base, adapters=parse_adapters(args.adapter), adapter_dir=args.adapter_dir,
                 name=args.name, host=args.host, port=args.port, api_key=api_key, dtype=args.dtype,
                 max_lora_rank=args.max_lora_rank, max_loras=args.max_loras, zero_adapter=not args.no_zero_adapter,
                 start_timeout=args.start_timeout, vllm_args=extra, max_model_len=args.max_model_len,
                 max_num_seqs=args.max_num_seqs, kv_cache_gib=args.kv_cache_gib,
                 max_adapter_mib=args.max_adapter_mib)
