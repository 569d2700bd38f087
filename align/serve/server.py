"""Lifecycle of `align serve`: check adapters -> start vLLM -> wait healthy -> proxy -> stop everything.

Whatever happens after vLLM starts (Ctrl-C, SIGTERM, vLLM dying, an exception), the `finally` stops
vLLM with all its descendants and removes the private folder holding its socket and the zero adapter.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from align.adapter_files import ZERO_ADAPTER_NAME, BaseInfo, ZeroAdapter, vllm_max_lora_rank
from align.errors import UserError
from align.serve.adapters import AdapterInfo, AdapterRefused, check_adapter, read_adapter


class _Stop(Exception):
    """Raised by the signal handler while we are still starting (before the event loop runs)."""


def _log(msg: str) -> None:
    print(f"align serve: {msg}", file=sys.stderr, flush=True)


def _adapters_in(folder: Path) -> list[Path]:
    return [p.parent for p in folder.glob("*/adapter_config.json")]


def _startup_adapters(adapters: dict[str, str], allowed: Path | None, base_info: BaseInfo,
                      max_lora_rank: int | None) -> tuple[dict[str, AdapterInfo], int]:
    """Read and check the adapters given at startup; max_lora_rank defaults to what holds them and --adapter-dir's."""
    infos = {}
    for adapter_name, path in adapters.items():
        try:
            infos[adapter_name] = read_adapter(Path(path).resolve())
        except AdapterRefused as e:
            raise UserError(f"--adapter {adapter_name}={path}: {e.message}") from None
    ranks = [i.rank for i in infos.values()]
    if allowed is not None:
        for folder in _adapters_in(allowed):
            try:
                ranks.append(read_adapter(folder).rank)
            except AdapterRefused:
                pass  # refused later, if anyone asks for it
    if max_lora_rank is None:
        try:
            max_lora_rank = vllm_max_lora_rank(ranks)
        except ValueError as e:
            raise UserError(str(e)) from None
    for adapter_name, info in infos.items():
        try:
            check_adapter(info, base_info, max_lora_rank)
        except AdapterRefused as e:
            raise UserError(f"--adapter {adapter_name}: {e.message}") from None
    return infos, max_lora_rank


def serve(base: str, adapters: dict[str, str], adapter_dir: str | None = None, name: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, dtype: str = "auto",
          max_lora_rank: int | None = None, max_loras: int | None = None, zero_adapter: bool = True,
          start_timeout: float = 600.0, vllm_args: list[str] | None = None) -> int:
    """Serve `base` with `adapters` (name -> folder) until SIGINT/SIGTERM; returns the exit code."""
    from align.serve.process import start_vllm, stop_tree, vllm_command, wait_healthy

    try:
        base_info = BaseInfo.read(base)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--base: {e}") from None
    name = name or base_info.path.name
    allowed = Path(adapter_dir).resolve() if adapter_dir else None
    if allowed is not None and not allowed.is_dir():
        raise UserError(f"--adapter-dir {adapter_dir}: not a folder")
    if name in adapters or name == ZERO_ADAPTER_NAME:
        raise UserError(f"--adapter: the name {name!r} is the base model's name (--name)")

    infos, max_lora_rank = _startup_adapters(adapters, allowed, base_info, max_lora_rank)
    if api_key is None and not host.startswith(("127.", "::1", "localhost")):
        _log(f"WARNING: binding {host} without an API key: anyone who can reach it can use the model "
             f"(set ALIGN_API_KEY or --api-key)")

    private = Path(tempfile.mkdtemp(prefix="align-serve-"))  # mode 0700: only we reach vLLM's socket
    uds = private / "vllm.sock"
    served = {n: str(i.path) for n, i in infos.items()}
    if zero_adapter:
        try:
            zero = ZeroAdapter(base_info.shapes, str(base_info.path))
            served[ZERO_ADAPTER_NAME] = str(zero.write(private / "zero-adapter"))
        except ValueError as e:
            shutil.rmtree(private, ignore_errors=True)
            raise UserError(f"{e} (pass --no-zero-adapter)") from None
    if max_loras is None:
        max_loras = max(1, len(served) + (2 if allowed is not None else 0))
    env = dict(os.environ)
    if allowed is not None:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    cmd = vllm_command(str(base_info.path), name, served, uds, max_lora_rank, max_loras, dtype, vllm_args or [])

    def on_signal(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    proc = None
    try:
        _log(f"starting vLLM: {' '.join(cmd)}")
        proc = start_vllm(cmd, env, sys.stderr)
        wait_healthy(proc, uds, start_timeout)
        from align.serve.proxy import ServeState

        state = ServeState(uds=uds, base=base_info, base_name=name, max_lora_rank=max_lora_rank,
                           adapters={n: i.path for n, i in infos.items()},
                           zero_name=ZERO_ADAPTER_NAME if zero_adapter else None,
                           adapter_dir=allowed, api_key=api_key)
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
        shutil.rmtree(private, ignore_errors=True)
        for s, handler in old.items():
            signal.signal(s, handler)
        _log("stopped")


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
        print(f"align serve: ready at http://{shown}:{bound}/v1", flush=True)
        print(f"align serve: models: {', '.join(state.models)}", flush=True)
        watcher = asyncio.create_task(watch_vllm())
        await stop.wait()
        watcher.cancel()
        _log(f"{reason[0]}: stopping")
        return 1 if reason[0].startswith("vLLM exited") else 0
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)
        await runner.cleanup()
