"""Atomic writes: build under a temporary name, then rename into place.

A crash leaves either the old file/folder or the new one, never half of one. The temporary
folder or file is created with os.mkdir(0o777) / os.open(0o666), so the kernel applies the umask
exactly as for a plain mkdir or open: tempfile.mkdtemp/mkstemp would give 0700/0600 whatever the
umask, and a server running as another account could not read the outputs. Libraries writing inside
a folder may still make private files (safetensors writes through a 0600 temporary file), so the
folder's tree is given those modes too before it is renamed into place.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path


def _fresh(parent: Path, prefix: str, create) -> tuple[Path, object]:
    """`create(path)` on a new random name `prefix`XXXXXXXX in `parent`; retries on a name already taken."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            return path, create(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free temporary name starting {prefix!r}")


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder in `parent` with the mode a plain mkdir gives (0o777 less the umask)."""
    return _fresh(Path(parent), prefix, lambda p: os.mkdir(p, 0o777))[0]


def make_temp_file(parent: str | os.PathLike, prefix: str) -> tuple[int, Path]:
    """A new empty file in `parent`, open for writing, with the mode a plain open gives (0o666 less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    path, fd = _fresh(Path(parent), prefix, lambda p: os.open(p, flags, 0o666))
    return fd, path


def apply_dir_modes(folder: str | os.PathLike, dir_mode: int) -> None:
    """Give every folder under `folder` (itself too) `dir_mode`, and every file `dir_mode` less execute
    unless it was executable; special bits (setgid) and symlinks are left as they are.

    Not the umask read with os.umask(): setting it to read it is racy across threads. The caller passes
    the mode of a folder just made with os.mkdir(0o777), which is what the umask gives.
    """
    dir_mode &= 0o777
    for root, dirs, files in os.walk(folder):
        for name in [None, *dirs, *files]:
            p = root if name is None else os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            perm = dir_mode if stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR else dir_mode & 0o666
            if stat.S_IMODE(st.st_mode) & 0o777 != perm:
                os.chmod(p, (stat.S_IMODE(st.st_mode) & ~0o777) | perm)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # as made: 0o777 less the umask
    try:
        yield tmp
        apply_dir_modes(tmp, mode)
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
    fd, tmp = make_temp_file(path.parent, f".{path.name}.tmp-")
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
