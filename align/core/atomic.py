"""Atomic writes: build under a temporary name, then rename into place.

A crash leaves either the old file/folder or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            # Two renames are not one, but the old copy survives until the new one is in place.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sweep_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove what atomic writes killed mid-way left in `folder`; returns the names removed.

    `.NAME.tmp-*` is a half-built file or folder: deleted. `.NAME.old-*` is the previous copy
    of a folder whose replacement was killed between its two renames: put back when NAME is
    missing, else deleted. Only this module's own prefixes are touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if not name.startswith(".") or (".tmp-" not in name and ".old-" not in name):
            continue
        if ".old-" in name:
            target = folder / name[1:].rsplit(".old-", 1)[0]
            if not target.exists():
                os.replace(p, target)
                continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(name)
    return removed
