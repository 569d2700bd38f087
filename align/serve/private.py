"""The server's private folder: vLLM's socket, its temporary files, the zero adapter and adapter copies.

One folder per server, `align-serve-<pid>-XXXX` in the system temporary folder, mode 0700, with an
`owner.json` naming the server's and vLLM's processes (pid and start time, so a reused pid does not
count as alive). A clean stop removes it; a SIGKILLed server cannot, so every start sweeps the
folders whose processes are all gone.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import psutil

PREFIX = "align-serve-"
OWNER = "owner.json"


def _identity(pid: int) -> dict:
    try:
        return {"pid": pid, "started": psutil.Process(pid).create_time()}
    except psutil.Error:
        return {"pid": pid, "started": None}


def _alive(ident: object) -> bool:
    if not isinstance(ident, dict) or not isinstance(ident.get("pid"), int):
        return False
    try:
        p = psutil.Process(ident["pid"])
        started = ident.get("started")
        same = isinstance(started, (int, float)) and abs(p.create_time() - started) < 1.0
        return same and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def make_private(parent: str | None = None) -> Path:
    """A fresh folder owned by this process; vLLM's temporary files go to its `tmp/`."""
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
    record_owner(folder, None)
    (folder / "tmp").mkdir(mode=0o700)
    return folder


def record_owner(folder: Path, vllm_pid: int | None) -> None:
    owner = {"server": _identity(os.getpid()), "vllm": None if vllm_pid is None else _identity(vllm_pid)}
    tmp = folder / f"{OWNER}.tmp"
    tmp.write_text(json.dumps(owner))
    os.replace(tmp, folder / OWNER)


def _owners(folder: Path) -> list:
    """The identities recorded in `folder`; from its name alone when owner.json is missing or broken."""
    try:
        with open(folder / OWNER, "rb") as f:  # our own file, in a 0700 folder of ours
            owner = json.loads(f.read(1 << 16))
        return [owner.get("server"), owner.get("vllm")]
    except (OSError, ValueError, AttributeError):
        pid = folder.name.removeprefix(PREFIX).split("-")[0]
        # Created but not yet recorded: alive while a process with that pid exists.
        return [{"pid": int(pid), "started": _identity(int(pid))["started"]}] if pid.isdigit() else []


def sweep_stale(parent: str | None = None, log=print) -> list[Path]:
    """Remove the private folders of servers that are gone (ours only: same user, real folders)."""
    removed = []
    root = Path(parent or tempfile.gettempdir())
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(PREFIX) or entry.name.removeprefix(PREFIX).split("-")[0] == str(os.getpid()):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        folder = Path(entry.path)
        owners = _owners(folder)
        if not owners or any(_alive(o) for o in owners):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
            log(f"removed {folder}, left by a server that is gone")
    return removed
