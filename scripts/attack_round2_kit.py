"""What scripts/attack_round2.py and its two case files share: the run context, `python -m align` runs, their checks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attack_reliability as ar  # noqa: E402  (a script beside this one: its runners and checks)

ROOT, DATA, ENV = ar.ROOT, ar.DATA, ar.ENV
SFT_DATA = ROOT / "tests" / "data" / "sft_tiny.jsonl"


class Ctx:
    """The tiny model, a tmp folder, the runs the cases damage copies of, and the table of outcomes."""

    def __init__(self, tmp: Path, model: Path):
        self.tmp, self.model, self.rows = tmp, model, []

    def add(self, cls: str, case: str, expected: str, held: bool, done=None) -> None:
        self.rows.append((cls, case, expected, bool(held)))
        why = "" if held or done is None else f"  rc {done.returncode}: {(done.stderr or done.stdout)[-600:]!r}"
        print(f"  {cls}: {case}: {'held' if held else 'NOT HELD'}{why}", flush=True)

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.rmtree(dst, ignore_errors=True)
        return Path(shutil.copytree(src, dst, symlinks=True))


def align(*args, umask: int | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m align ARGS` as a user runs it (optionally under a umask)."""
    cmd = [sys.executable, "-m", "align", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def recipe(name: str, model: Path, out: Path, *extra, data: Path | str | None = None) -> list:
    """A tiny run of `name`'s recipe: its tiny config, this model, no trackers, no evaluation."""
    data = data if data is not None else (SFT_DATA if name == "sft" else DATA)
    return [name, "--config", f"configs/{name}_tiny.yaml", "--train_file", data, "--model_name_or_path", model,
            "--output_dir", out, "--report_to", "none", "--eval_fraction", "0", *extra]


def one_line(done: subprocess.CompletedProcess, *needles) -> bool:
    """Exit 2, no traceback, and the error is a single `error: ` line (the last) holding every needle.

    attack_reliability.one_line_error wants stderr to be that line alone; here a model may have loaded
    before the check (its progress bars are on stderr too), so only the error lines count."""
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    return (done.returncode == 2 and clean(done) and len(errors) == 1 and lines[-1] == errors[0]
            and all(str(n) in errors[0] for n in needles))


def clean(done: subprocess.CompletedProcess) -> bool:
    return "Traceback" not in done.stderr + done.stdout


def tree_hash(path: Path) -> str:
    """Every file's relative path and bytes under `path` (a file: its bytes)."""
    h = hashlib.sha256()
    for p in sorted([path, *path.rglob("*")] if path.is_dir() else [path]):
        h.update(str(p.relative_to(path) if p != path else ".").encode())
        if p.is_symlink():
            h.update(str(p.readlink()).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def rename_tensors(path: Path, old: str, new: str) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k.replace(old, new): v for k, v in load_file(str(path)).items()}, str(path))


def refused_untouched(ctx: Ctx, cls: str, case: str, args: list, watch: Path, *needles) -> None:
    """A command refused in one line naming `needles`, `watch` byte-identical afterwards."""
    before = tree_hash(watch)
    done = align(*args)
    named = ", ".join(n.name if isinstance(n, Path) else str(n) for n in needles)
    ctx.add(cls, case, f"one line naming {named}; exit 2; {watch.name} unchanged (hash)",
            one_line(done, *needles) and tree_hash(watch) == before, done)


# -- the runs every class starts from ---------------------------------------------------------------
def make_runs(ctx: Ctx) -> None:
    """A 2-step DPO run (policy adapter + checkpoints) and a 2-step reward run (reward_model/)."""
    ctx.policy, ctx.reward = ctx.tmp / "policy", ctx.tmp / "reward"
    for done in (align(*recipe("dpo", ctx.model, ctx.policy, "--max_steps", "2", "--save_steps", "1")),
                 align(*recipe("reward", ctx.model, ctx.reward, "--max_steps", "2", "--save_steps", "1"))):
        assert done.returncode == 0, done.stderr[-3000:]


def launch(processes: int, *args) -> subprocess.CompletedProcess:
    """`accelerate launch --num_processes N -m align ARGS` (CPU processes, gloo), as a user starts a DDP run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
           "--num_processes", str(processes), "--main_process_port", str(port), "-m", "align", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def measured(ctx: Ctx, path: Path) -> tuple[subprocess.CompletedProcess, int, float]:
    """`align data check PATH` run once: its outcome, its peak RSS in bytes and its seconds."""
    code = ("import resource, runpy, sys\nsys.argv = ['align', *sys.argv[1:]]\ntry:\n"
            "    runpy.run_module('align', run_name='__main__')\nfinally:\n"
            "    print('peak-rss-kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "data", "check", str(path), "--recipe", "dpo",
                           "--model_name_or_path", str(ctx.model)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    sec = time.perf_counter() - t0
    kb = [int(x.split()[1]) for x in done.stderr.splitlines() if x.startswith("peak-rss-kb")]
    return done, (kb[0] * 1024 if kb else 1 << 62), sec


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta) if ta.keys() == tb.keys() else float("inf")


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def modes_ok(root: Path, umask: int) -> bool:
    """Every folder under root (itself included) has 0o777 & ~umask, every file 0o666 & ~umask."""
    if not root.is_dir():
        return False
    bad = [p for p in [root, *root.rglob("*")]
           if stat.S_IMODE(p.lstat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask]
    for p in bad[:3]:
        print(f"    mode {stat.S_IMODE(p.lstat().st_mode):o}: {p}")
    return not bad
