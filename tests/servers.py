"""Tests' `align serve` processes: start one (this checkout's code), wait for its ready line, stop or kill its tree.

The reading and the killing are the library's own (align/serve/process.py), shared with the benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from align.serve.process import kill_tree, stop_tree, wait_for_line

ROOT = Path(__file__).resolve().parents[1]


def start_align_serve(args: list[str], log: Path, api_key: str | None = None, append: bool = False) -> subprocess.Popen:
    """`python -m align.serve ARGS` with stdout piped (for the ready line) and stderr into `log`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("ALIGN_API_KEY", None)
    if api_key is not None:
        env["ALIGN_API_KEY"] = api_key
    with open(log, "a" if append else "w") as err:
        # cwd too: `python -m` puts the working folder first on sys.path, ahead of PYTHONPATH.
        return subprocess.Popen([sys.executable, "-m", "align.serve", *args], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env, cwd=ROOT)


def wait_ready(proc: subprocess.Popen, log: Path, timeout_s: float = 300, lines: list[str] | None = None,
               until: str | None = None) -> str:
    """The server's URL once it prints its ready line (and a later line holding `until`, if given; `lines`
    gets what it printed from the ready line on); if it exits or never gets there, kill it and raise."""
    url = wait_for_line(proc, timeout_s=timeout_s, lines=lines, until=until)
    if url is None:
        kill_tree(proc)
        raise RuntimeError(f"align serve did not become ready (exit code {proc.returncode}); log {log}:\n"
                           f"{log.read_text()[-3000:]}")
    return url


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's tree, SIGKILL what outlives the grace period; nothing if it is gone already."""
    if proc.poll() is None:
        stop_tree(proc)


__all__ = ["kill_tree", "start_align_serve", "stop", "wait_ready"]
