"""Lifecycle of `align serve`: check adapters -> start vLLM -> wait healthy -> proxy -> stop everything.

Whatever happens after vLLM starts (Ctrl-C, SIGTERM, vLLM dying, an exception), the `finally` stops
vLLM with all its descendants and removes the private folder holding its socket, its temporary files,
the zero adapter and the adapter copies; after a SIGKILL the next start removes it (align/serve/private.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

from align.core.adapter_files import (
    VLLM_LORA_RANKS,
    ZERO_ADAPTER_NAME,
    BaseInfo,
    ZeroAdapter,
    vllm_max_lora_rank,
)
from align.core.errors import UserError
from align.serve.adapters import (
    AdapterInfo,
    AdapterRefused,
    check_adapter,
    check_name,
    read_adapter,
    snapshot_adapter,
)
from align.serve.fs import FsGuard, short
from align.serve.private import make_private, record_owner, sweep_stale
from align.serve.process import OWN_VLLM_OPTIONS, READY_MARKER, tree_rss, vllm_env


class _Stop(Exception):
    """Raised by the signal handler while we are still starting (before the event loop runs)."""


def _log(msg: str) -> None:
    print(f"align serve: {msg}", file=sys.stderr, flush=True)


MIB = 1 << 20


def _dir_adapters(allowed: Path, guard: FsGuard, base_info: BaseInfo) -> list[int]:
    """Ranks of the usable adapters in --adapter_dir's sub-folders; each bad one is logged (one line) and skipped."""
    ranks = []
    try:
        entries = sorted(os.scandir(allowed), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"--adapter_dir {allowed}: cannot be listed ({e.strerror})") from None
    for entry in entries:
        folder = Path(entry.path)
        if not os.path.lexists(folder / "adapter_config.json"):
            continue
        try:
            info = guard.run(str(folder), read_adapter, folder, allowed)
            guard.run(str(folder), check_adapter, info, base_info, max(VLLM_LORA_RANKS))
            ranks.append(info.rank)
        except AdapterRefused as e:
            _log(f"--adapter_dir: skipped {short(entry.name)}: {e.message}")
    return ranks


def _startup_adapters(adapters: dict[str, str], allowed: Path | None, base_info: BaseInfo,
                      max_lora_rank: int | None, copies: Path, guard: FsGuard,
                      limit: int) -> tuple[dict[str, AdapterInfo], int]:
    """Copy and check the adapters given at startup; max_lora_rank defaults to what holds them and --adapter_dir's."""
    infos = {}
    copies.mkdir(mode=0o700)
    for adapter_name, path in adapters.items():
        try:
            # The operator chose these folders: their files may lie anywhere, but must be regular files.
            infos[adapter_name] = guard.run(path, snapshot_adapter, Path(path), None, copies / adapter_name, limit)
        except AdapterRefused as e:
            raise UserError(f"--adapter {adapter_name}={path}: {e.message}") from None
    ranks = [i.rank for i in infos.values()]
    if allowed is not None:
        ranks += _dir_adapters(allowed, guard, base_info)
    if max_lora_rank is None:
        try:
            max_lora_rank = vllm_max_lora_rank(ranks)
        except ValueError as e:
            raise UserError(str(e)) from None
    for adapter_name, info in infos.items():
        try:
            guard.run(adapter_name, check_adapter, info, base_info, max_lora_rank)
        except AdapterRefused as e:
            raise UserError(f"--adapter {adapter_name}: {e.message}") from None
    return infos, max_lora_rank


def kv_settings(base_info: BaseInfo, dtype: str, max_model_len: int | None, max_num_seqs: int,
                kv_cache_gib: float | None) -> dict[str, int]:
    """vLLM's max_model_len, max_num_seqs and kv_cache_memory_bytes for this base (align/engines/kv_cache.py)."""
    from types import SimpleNamespace

    from align.engines.kv_cache import DTYPE_BYTES, kv_cache_bytes

    cfg = base_info.config
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    if max_model_len is None:
        max_model_len = text.get("max_position_embeddings") or cfg.get("max_position_embeddings")
        if not isinstance(max_model_len, int) or max_model_len < 1:
            raise UserError(f"--base {base_info.path}: config.json has no max_position_embeddings; "
                            "give --max_model_len")
    if max_num_seqs < 1 or max_model_len < 1:
        raise UserError(f"--max_num_seqs and --max_model_len must be >= 1, got {max_num_seqs} and {max_model_len}")
    if kv_cache_gib is not None:
        if kv_cache_gib <= 0:
            raise UserError(f"--kv_cache_gib: expected a positive size, got {kv_cache_gib}")
        size = int(kv_cache_gib * (1 << 30))
    else:
        # "auto" keeps the checkpoint's dtype (or downcasts it): its width is an upper bound.
        kind = dtype if dtype in DTYPE_BYTES else str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        kind = {"float": "float32", "half": "float16"}.get(kind, kind)
        try:
            config = SimpleNamespace(**{**text, "text_config": None})
            size = kv_cache_bytes(config, kind if kind in DTYPE_BYTES else "float32", max_model_len, max_num_seqs)
        except (AttributeError, TypeError, ZeroDivisionError):
            raise UserError(f"--base {base_info.path}: cannot size the KV cache from config.json "
                            "(layers, heads, hidden size); give --kv_cache_gib") from None
    return {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs, "kv_cache_memory_bytes": size}


def _check_vllm_args(extra: list[str]) -> None:
    for arg in extra:
        if arg.split("=")[0] in OWN_VLLM_OPTIONS:
            raise UserError(f"{arg.split('=')[0]} after `--`: give it to align serve itself (before `--`), which "
                            "sizes the KV cache from it")


def _log_memory(proc, memory: dict[str, int]) -> None:
    tree = tree_rss(os.getpid())
    vllm = sum(rss for pid, (_, rss) in tree_rss(proc.pid).items())
    _log(f"memory after start: KV cache {memory['kv_cache_memory_bytes'] / MIB:.0f} MiB (for "
         f"{memory['max_num_seqs']} sequences of {memory['max_model_len']} tokens); resident: vLLM "
         f"{vllm / MIB:.0f} MiB, server process tree {sum(r for _, r in tree.values()) / MIB:.0f} MiB "
         f"({len(tree)} processes)")


def serve(base: str, adapters: dict[str, str], adapter_dir: str | None = None, name: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, dtype: str = "auto",
          max_lora_rank: int | None = None, max_loras: int | None = None, zero_adapter: bool = True,
          start_timeout: float = 600.0, vllm_args: list[str] | None = None, max_model_len: int | None = None,
          max_num_seqs: int = 16, kv_cache_gib: float | None = None, max_adapter_mib: int = 2048) -> int:
    """Serve `base` with `adapters` (name -> folder) until SIGINT/SIGTERM; returns the exit code."""
    try:
        base_info = BaseInfo.read(base)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--base: {e}") from None
    name = name or base_info.path.name
    allowed = Path(adapter_dir).resolve() if adapter_dir else None
    if allowed is not None and not allowed.is_dir():
        raise UserError(f"--adapter_dir {adapter_dir}: not a folder")
    if name in adapters or name == ZERO_ADAPTER_NAME:
        raise UserError(f"--adapter: the name {name!r} is the base model's name (--name)")
    try:
        for n in [name, *adapters]:
            check_name(n, "--name" if n == name else "--adapter")
    except AdapterRefused as e:
        raise UserError(f"{e.message}; use --name to name the base") from None
    _check_vllm_args(vllm_args or [])
    memory = kv_settings(base_info, dtype, max_model_len, max_num_seqs, kv_cache_gib)
    sweep_stale(log=_log)
    private = make_private()  # mode 0700: only we reach vLLM's socket
    _log(f"private folder {private}")
    try:
        return _serve_in(private, base_info, adapters, allowed, name, host, port, api_key, dtype, max_lora_rank,
                         max_loras, zero_adapter, start_timeout, vllm_args or [], memory, max_adapter_mib * MIB)
    finally:
        shutil.rmtree(private, ignore_errors=True)
        _log("stopped")


def _serve_in(private, base_info, adapters, allowed, name, host, port, api_key, dtype, max_lora_rank, max_loras,
              zero_adapter, start_timeout, vllm_args, memory, adapter_limit) -> int:
    from align.serve.process import start_vllm, stop_tree, vllm_command, wait_healthy

    guard = FsGuard()
    infos, max_lora_rank = _startup_adapters(adapters, allowed, base_info, max_lora_rank, private / "adapters",
                                             guard, adapter_limit)
    if api_key is None and not host.startswith(("127.", "::1", "localhost")):
        _log(f"WARNING: binding {host} without an API key: anyone who can reach it can use the model "
             f"(set ALIGN_API_KEY or --api_key)")
    uds = private / "vllm.sock"
    served = {n: str(i.snapshot) for n, i in infos.items()}
    if zero_adapter:
        try:
            zero = ZeroAdapter(base_info.shapes, str(base_info.path))
            served[ZERO_ADAPTER_NAME] = str(zero.write(private / "zero-adapter"))
        except ValueError as e:
            raise UserError(f"{e} (pass --no_zero_adapter)") from None
    if max_loras is None:
        max_loras = max(1, len(served) + (2 if allowed is not None else 0))
    cmd = vllm_command(str(base_info.path), name, served, uds, max_lora_rank, max_loras, dtype, vllm_args, memory)

    def on_signal(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    proc = None
    try:
        _log(f"starting vLLM: {' '.join(cmd)}")
        proc = start_vllm(cmd, vllm_env(private, allowed is not None), sys.stderr)
        record_owner(private, proc.pid)
        wait_healthy(proc, uds, start_timeout)
        _log_memory(proc, memory)
        from align.serve.proxy import ServeState

        state = ServeState(uds=uds, base=base_info, base_name=name, max_lora_rank=max_lora_rank,
                           adapters={n: i.snapshot for n, i in infos.items()},
                           zero_name=ZERO_ADAPTER_NAME if zero_adapter else None,
                           adapter_dir=allowed, api_key=api_key, guard=guard, copies=private / "adapters",
                           adapter_limit=adapter_limit)
        return asyncio.run(_run_proxy(state, host, port, proc))
    except _Stop as e:
        _log(f"{e}: stopping")
        return 0
    except RuntimeError as e:
        raise UserError(str(e)) from None
    finally:
        # From here on a second Ctrl-C must not interrupt the cleanup.
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        if proc is not None:
            stop_tree(proc)
        for s, handler in old.items():
            signal.signal(s, handler)


async def _run_proxy(state, host: str, port: int, proc) -> int:
    from aiohttp import web

    from align.serve.proxy import build_app

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason: list[str] = []

    def request_stop(why: str) -> None:
        reason.append(why)
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, request_stop, signal.Signals(s).name)

    async def watch_vllm():
        while proc.poll() is None:
            await asyncio.sleep(1.0)
        request_stop(f"vLLM exited with code {proc.returncode}")

    runner = web.AppRunner(build_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise RuntimeError(f"cannot bind {host}:{port}: {e.strerror}") from None
        bound = site._server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"align serve: {READY_MARKER}http://{shown}:{bound}/v1", flush=True)
        print(f"align serve: models: {', '.join(state.models)}", flush=True)
        from align.serve.client_examples import client_examples

        print("\n".join(client_examples(f"http://{shown}:{bound}/v1", state.models, state.api_key is not None)),
              flush=True)
        watcher = asyncio.create_task(watch_vllm())
        await stop.wait()
        watcher.cancel()
        _log(f"{reason[0]}: stopping")
        return 1 if reason[0].startswith("vLLM exited") else 0
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)
        await runner.cleanup()
