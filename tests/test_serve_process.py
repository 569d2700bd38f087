"""align/serve/process.py's helpers for callers of `align serve` (tests, benchmarks), on real processes:
the ready-line reader and the tree kill."""

from __future__ import annotations

import subprocess
import sys

import psutil

from align.serve.process import READY_MARKER, kill_tree, wait_for_line


def python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ready_line_found_and_output_after_it_drained():
    # 1 MiB after the ready line: far more than a pipe holds, so the child exits only if someone reads on.
    proc = python("import sys\nprint('loading'); print('align serve: " + READY_MARKER + "http://127.0.0.1:5/v1 ')\n"
                  "sys.stdout.flush(); sys.stdout.write('x' * (1 << 20) + '\\n'); sys.stdout.flush()")
    assert wait_for_line(proc, timeout_s=120) == "http://127.0.0.1:5/v1"
    assert proc.wait(timeout=120) == 0


def test_lines_after_the_ready_line_kept_until_the_last_expected_one():
    proc = python("print('loading')\nprint('align serve: " + READY_MARKER + "http://h:1/v1')\n"
                  "print('models: a, b'); print('curl x')\n"
                  "print('end', flush=True)")
    lines: list[str] = []
    assert wait_for_line(proc, timeout_s=120, lines=lines, until="curl") == "http://h:1/v1"
    assert lines == ["align serve: ready at http://h:1/v1", "models: a, b", "curl x"]
    assert proc.wait(timeout=120) == 0
    # A process that ends before the awaited line: no URL, however far it got.
    early = python("print('align serve: " + READY_MARKER + "http://h:1/v1')")
    assert wait_for_line(early, timeout_s=120, until="curl") is None


def test_no_ready_line_is_none_whether_it_exits_or_hangs():
    exits = python("print('starting'); raise SystemExit(3)")
    assert wait_for_line(exits, timeout_s=120) is None
    assert exits.wait(timeout=120) == 3
    hangs = python("import time; print('starting', flush=True); time.sleep(300)")
    try:
        assert wait_for_line(hangs, timeout_s=0.5) is None
        assert hangs.poll() is None  # the time limit ended the wait, not the process
    finally:
        hangs.kill()
        hangs.wait()


def test_kill_tree_kills_a_grandchild_that_left_the_session():
    # The grandchild starts its own session: a process-group kill would miss it, the tree kill must not.
    proc = python("import subprocess, sys, time\n"
                  "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
                  "print(g.pid, flush=True); time.sleep(300)")
    grandchild = psutil.Process(int(proc.stdout.readline()))
    assert grandchild.ppid() == proc.pid and not gone(grandchild)
    kill_tree(proc)
    assert proc.returncode is not None
    psutil.wait_procs([grandchild], timeout=60)
    assert gone(grandchild)
