"""The output-folder policy every recipe shares, checked before any model loads.

A folder that already holds a run is refused unless the user says `--resume` or `--overwrite`;
a model name that cannot be found offline is an error now, not after minutes of loading; a run
that diverges names the checkpoint it can continue from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from align.core.errors import UserError
from align.train.state import CHECKPOINTS, CheckpointError, find_checkpoint, latest_checkpoint

# Files whose presence means a folder already holds a run.
RUN_MARKERS = ("config.yaml", CHECKPOINTS, "metrics.jsonl")


def prepare_output_dir(out: Path, resume: bool | str | None = None, overwrite: bool = False,
                       main: bool = True, dry_run: bool = False) -> Path | None:
    """Apply the output-folder policy; returns the checkpoint to resume from, if any.

    A folder that already holds a run is refused unless `resume` (continue it: the latest
    checkpoint, or the one named) or `overwrite` (delete it and start over) is given.
    Only the main process (`main`) deletes; the others apply the same checks and read.
    `dry_run` (--check-config): every check, nothing deleted.
    """
    check_not_a_file(out, "output_dir", "new or holding a run")
    check_writable(out, "output_dir")
    held = [m for m in RUN_MARKERS if (out / m).exists()]
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite: choose one")
        checkpoint = find_checkpoint(out, None if resume is True else str(resume))
        if checkpoint is None and main:
            print(f"[align] no checkpoint in {out}; starting fresh")
        return checkpoint
    if held:
        if not overwrite:
            raise UserError(f"output_dir: {out} already holds a run ({', '.join(held)}); pass --resume to "
                            f"continue it or --overwrite to delete it and start over")
        check_deletable(out, "a run folder")
        if main and not dry_run:
            shutil.rmtree(out)
    return None


def check_not_a_file(out: Path, field: str, expected: str) -> None:
    """An output folder cannot be a file, nor sit inside one: refused, never moved aside."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{field}: {out} is a file; expected a folder ({expected})")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{field}: {out} is inside {blocking}, which is a file")


def check_writable(out: Path, field: str, beside: bool = False) -> None:
    """The folder `out` is, or would be made in, takes new entries (`beside`: the folder `out` sits in, where an
    atomic write puts its temporary): tried with an empty folder removed at once, as permissions alone do not
    tell (root passes os.access on /proc, where nothing can be made)."""
    import tempfile

    where = next((p for p in (*([] if beside else [out]), *out.parents) if p.exists()), Path("."))
    try:
        Path(tempfile.mkdtemp(prefix=".align-probe-", dir=where)).rmdir()
    except OSError as e:
        raise UserError(f"{field}: cannot write {out}: {where} does not take new files or folders "
                        f"({e.strerror or e})") from None


def check_deletable(out: Path, what: str) -> None:
    """--overwrite never deletes the working folder, the home folder or /."""
    if out.resolve() in (Path.cwd().resolve(), Path.home().resolve(), Path("/")):
        raise UserError(f"--overwrite: refusing to delete {out.resolve()}; choose {what} of its own")


def check_model_available(name: str, resolved: str) -> None:
    """With the hub offline, a name that is neither a local folder nor cached is an error now, not at load."""
    import os

    if Path(resolved).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(resolved, "config.json"), str):
        raise UserError(f"model_name_or_path: {name!r} is not a local folder, and the hub is offline "
                        f"(HF_HUB_OFFLINE) with no cached copy of it")


def last_good(out: Path) -> str:
    """What a diverged run in `out` can continue from, claiming intact only what was verified just now."""
    try:
        path = latest_checkpoint(out, say=lambda _: None)
    except CheckpointError as e:
        return f"No checkpoint is intact: {e}"
    return (f"The newest checkpoint, {path}, verified intact (continue with --resume, perhaps with a lower "
            f"learning_rate)." if path else "No checkpoint was written yet.")
