"""File-system access for `align serve`, where every path and every byte may be hostile.

- `open_regular` opens a file only when it is a regular file whose resolved path lies inside the
  allowed root (symlinked files and folders alike); a FIFO, device or socket is refused before it is
  opened, and the open itself never blocks (O_NONBLOCK), so a FIFO swapped in later cannot hang us.
- `FsGuard` runs file-system work on daemon threads with a time limit: a stuck file system turns
  into a refusal, while the proxy's event loop keeps answering. A thread still stuck keeps its
  slot, so at most `slots` such threads ever exist (docs/design.md, "Serving hostile input").
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path

from align.core.adapter_verify import short
from align.serve.refusal import AdapterRefused

FS_TIMEOUT_S = 10.0
JSON_FILE_LIMIT = 1 << 20  # adapter_config.json / align_meta.json: far more than any real one
PATH_CHARS_LIMIT = 4096
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_path_text(text: object, field: str) -> str:
    """A path given by a client: a non-empty str without NUL, control or format characters (400)."""
    if not isinstance(text, str) or not text:
        raise AdapterRefused(400, f"{field!r}: expected a non-empty path, got {short(text)}")
    if len(text) > PATH_CHARS_LIMIT:
        raise AdapterRefused(400, f"{field!r}: path longer than {PATH_CHARS_LIMIT} characters")
    # Cc: NUL and other controls; Cf: invisible format marks (right-to-left overrides);
    # Cs: lone surrogates, which no file name on disk decodes to as UTF-8.
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs")), None)
    if bad is not None:
        raise AdapterRefused(400, f"{field!r}: path contains the character U+{ord(bad):04X}, which is not allowed")
    return text


def _fd_path(fd: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def open_regular(path: Path, root: Path | None, what: str) -> int:
    """A read-only descriptor of `path`, a regular file inside `root` once resolved; AdapterRefused otherwise."""
    try:
        real = Path(os.path.realpath(path))
        if root is not None and not inside(real, root):
            raise AdapterRefused(403, f"{what} {path} resolves to {real}, outside the allowed folder {root}")
        st = os.stat(real)
    except FileNotFoundError:
        raise AdapterRefused(404, f"no {what} at {path}") from None
    except (OSError, ValueError) as e:
        raise AdapterRefused(400, f"{what} {path}: cannot be read ({e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise AdapterRefused(400, f"{what} {path} is {kind}; only regular files are read")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise AdapterRefused(400, f"{what} {path}: cannot be opened ({e.strerror})") from None
    fst = os.fstat(fd)
    opened = _fd_path(fd)
    # The path may have changed between the checks and the open (a file or a folder swapped for a
    # link or a FIFO): what was opened must be what was checked, and still inside the root.
    if (not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino)
            or (root is not None and opened is not None and not inside(opened, root))):
        os.close(fd)
        raise AdapterRefused(409, f"{what} {path} changed while it was being opened")
    return fd


def read_regular(path: Path, root: Path | None, what: str, limit: int) -> bytes:
    """The whole content of a regular file of at most `limit` bytes (see open_regular)."""
    fd = open_regular(path, root, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise AdapterRefused(400, f"{what} {path} is {size} bytes; at most {limit} are read")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise AdapterRefused(400, f"{what} {path} grew past {limit} bytes while being read")
        return data
    finally:
        os.close(fd)


def copy_regular(src: Path, root: Path | None, dest: Path, what: str, limit: int) -> int:
    """Copy the regular file `src` (see open_regular) to a new file `dest`; the bytes copied."""
    fd = open_regular(src, root, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise AdapterRefused(413, f"{what} {src} is {size} bytes; at most {limit} are accepted")
        copied = 0
        with os.fdopen(os.dup(fd), "rb") as f, open(dest, "xb") as out:
            while chunk := f.read(min(1 << 20, limit + 1 - copied)):
                copied += len(chunk)
                if copied > limit:
                    raise AdapterRefused(413, f"{what} {src} grew past the limit of {limit} bytes while copied")
                out.write(chunk)
        if copied != size:
            raise AdapterRefused(409, f"{what} {src} changed size while it was copied")
        return copied
    finally:
        os.close(fd)


class FsGuard:
    """Runs file-system work off the event loop, each call on its own daemon thread, within `timeout_s`.

    Daemon threads, not an executor: a thread stuck in the kernel cannot be cancelled, and an
    executor's threads are joined at exit, so one stuck read would also hang the shutdown.
    """

    def __init__(self, timeout_s: float = FS_TIMEOUT_S, slots: int = 4):
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(slots)

    def _start(self, fn: Callable, args: tuple, done: Callable[[object, BaseException | None], None]) -> None:
        if not self._slots.acquire(blocking=False):
            raise AdapterRefused(429, "file-system checks are stuck on earlier requests; try again later")

        def work():
            try:
                result, exc = fn(*args), None
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                result, exc = None, e
            finally:
                self._slots.release()
            done(result, exc)

        threading.Thread(target=work, name="align-serve-fs", daemon=True).start()

    def _timed_out(self, what: str) -> AdapterRefused:
        return AdapterRefused(422, f"{what}: the file system did not answer within {self.timeout_s:g} s")

    def run(self, what: str, fn: Callable, *args):
        """Blocking form, for start-up (before the event loop runs)."""
        box: list = []
        finished = threading.Event()
        self._start(fn, args, lambda r, e: (box.append((r, e)), finished.set()))
        if not finished.wait(self.timeout_s):
            raise self._timed_out(what)
        result, exc = box[0]
        if exc is not None:
            raise exc
        return result

    async def arun(self, what: str, fn: Callable, *args):
        """Awaitable form: the event loop keeps serving while the thread works."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result, exc):
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(result)

        def done(result, exc):
            try:
                loop.call_soon_threadsafe(settle, result, exc)
            except RuntimeError:  # the loop closed while the thread was stuck
                pass

        self._start(fn, args, done)
        try:
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise self._timed_out(what) from None
