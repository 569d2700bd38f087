"""What `align serve` checks before an adapter reaches vLLM.

vLLM loads whatever folder it is given; these checks turn a wrong folder into a clear 4xx message
instead of a 500 or, worse, an adapter silently applied to a base it was not trained on. vLLM never
reads a client's folder: the two files it reads are copied (confined, regular files only) into the
server's private folder, the copy is checked, and vLLM loads the copy, which nobody else can change
(docs/design.md, "Serving hostile input").
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from align.core.adapter_files import BaseInfo, content_digest, vllm_max_lora_rank, weight_files
from align.core.adapter_verify import (
    CONFIG,
    META,
    WEIGHTS,
    AdapterInvalid,
    check_config,
    check_fingerprint,
    check_finite,
    check_meta,
    check_tensors,
    header_linears,
    header_shapes,
    json_object,
)
from align.serve.fs import JSON_FILE_LIMIT, copy_regular, inside, open_regular, read_regular, short
from align.serve.refusal import AdapterRefused

__all__ = ["AdapterInfo", "AdapterRefused", "check_adapter", "check_name", "read_adapter", "resolve_in_folder",
           "snapshot_adapter"]

# Model names clients may use: ASCII letters, digits and . _ : - (no look-alike letters, no paths).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_name(name: object, field: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AdapterRefused(400, f"{field!r}: expected 1-128 ASCII letters, digits or . _ : - (starting with a "
                                  f"letter or digit), got {short(name)}")
    return name


# -- reading folders -------------------------------------------------------------------------------
def parse_json_object(data: bytes, where: Path) -> dict:
    """A JSON object from bytes; AdapterRefused(400) naming the file and line when it is not one."""
    with refused(400):
        return json_object(data, where)


def read_safetensors_header(path: Path, root: Path | None) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, every field checked against the file's size
    (align.core.adapter_verify.header_shapes, on a confined regular file)."""
    fd = open_regular(path, root, WEIGHTS)
    try:
        with refused(400):
            return header_shapes(lambda offset, n: os.pread(fd, n, offset), os.fstat(fd).st_size, path)
    finally:
        os.close(fd)


@contextmanager
def refused(status: int):
    """The shared verification's AdapterInvalid as this server's refusal with `status`."""
    try:
        yield
    except AdapterInvalid as e:
        raise AdapterRefused(status, str(e)) from None


@dataclass
class AdapterInfo:
    path: Path
    rank: int
    config: dict
    meta: dict | None
    shapes: dict[str, list[int]]
    snapshot: Path | None = None  # the private copy vLLM loads (runtime and start-up adapters)


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _folder(path: Path, root: Path | None) -> Path:
    try:
        real = Path(os.path.realpath(path))
        is_dir = real.is_dir()
    except (OSError, ValueError) as e:
        raise AdapterRefused(400, f"adapter folder {path}: cannot be read ({e})") from None
    if root is not None and not inside(real, root):
        raise AdapterRefused(403, f"adapter path {path} is outside the allowed folder {root} (--adapter_dir)")
    if not is_dir:
        raise AdapterRefused(404, f"no adapter folder at {path}")
    return real


def read_adapter(path: str | os.PathLike, root: Path | None = None) -> AdapterInfo:
    """Read and check a PEFT adapter folder whose files must all resolve inside `root` (None: anywhere).

    AdapterRefused: 404 missing, 403 outside `root`, 400 not a well-formed safetensors LoRA adapter.
    """
    folder = _folder(Path(path), root)
    try:
        config = parse_json_object(read_regular(folder / CONFIG, root, CONFIG, JSON_FILE_LIMIT), folder / CONFIG)
    except AdapterRefused as e:
        if e.status == 404:
            raise AdapterRefused(404, f"{folder}: not a PEFT adapter (no {CONFIG})") from None
        raise
    try:
        shapes = read_safetensors_header(folder / WEIGHTS, root)
    except AdapterRefused as e:
        if e.status == 404:
            raise AdapterRefused(404, f"{folder}: no {WEIGHTS} (only safetensors adapters are served)") from None
        raise
    meta = None
    if os.path.lexists(folder / META):
        meta = parse_json_object(read_regular(folder / META, root, META, JSON_FILE_LIMIT), folder / META)
    with refused(400):
        check_config(config, folder / CONFIG)
        if meta is not None:
            check_meta(meta, folder / META)
    return AdapterInfo(folder, _rank(folder, config, shapes), config, meta, shapes)


def _rank(folder: Path, config: dict, shapes: dict[str, list[int]]) -> int:
    """The adapter's largest rank, as vLLM computes it, after checking the tensors agree with the config."""
    where = folder / CONFIG
    r, pattern = config.get("r"), config.get("rank_pattern") or {}
    if not _positive(r):
        raise AdapterRefused(400, f"{where}: field 'r': expected a positive integer, got {short(r)}")
    if not isinstance(pattern, dict) or not all(_positive(v) for v in pattern.values()):
        raise AdapterRefused(400, f"{where}: field 'rank_pattern': expected module -> positive integer")
    rank = max([r, *pattern.values()])
    pairs = 0
    for key, a in shapes.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = shapes.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:  # missing and unexpected tensors are named by check_adapter's shared check_tensors
            continue
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterRefused(400, f"{folder / WEIGHTS}: {short(key)} {a} has no matching lora_B "
                                      f"(shape {b}) of the same rank")
        if a[0] > rank or (not pattern and a[0] != r):
            raise AdapterRefused(400, f"{folder / WEIGHTS}: {short(key)} has rank {a[0]}, but {CONFIG} says "
                                      f"r={r}{' and rank_pattern' if pattern else ''}")
        pairs += 1
    if not pairs:
        raise AdapterRefused(400, f"{folder / WEIGHTS}: no LoRA tensors (*.lora_A.weight)")
    return rank


def snapshot_adapter(src: Path, root: Path | None, dest: Path, limit: int) -> AdapterInfo:
    """Copy the files vLLM reads (and align_meta.json) from `src` into the new folder `dest`, then read the copy.

    Only `dest` is ever given to vLLM: what was checked is what is served, even if `src` changes.
    """
    folder = _folder(src, root)
    dest.mkdir(mode=0o700)
    for name, required in ((CONFIG, True), (WEIGHTS, True), (META, False)):
        if not required and not os.path.lexists(folder / name):
            continue
        try:
            copy_regular(folder / name, root, dest / name, name, limit if name == WEIGHTS else JSON_FILE_LIMIT)
        except AdapterRefused as e:
            if e.status == 404:
                raise AdapterRefused(404, f"{folder}: " + (f"not a PEFT adapter (no {CONFIG})" if name == CONFIG
                                     else f"no {WEIGHTS} (only safetensors adapters are served)")) from None
            if e.status == 413 and name == WEIGHTS:
                raise AdapterRefused(413, f"{e.message} (--max_adapter_mib)") from None
            raise
    try:
        info = read_adapter(dest, dest)
    except AdapterRefused as e:  # messages name the client's folder, not the private copy
        raise AdapterRefused(e.status, e.message.replace(str(dest), str(folder))) from None
    info.path = folder
    info.snapshot = dest
    return info


# -- the checks ------------------------------------------------------------------------------------
def check_adapter(adapter: AdapterInfo, base: BaseInfo, max_rank: int) -> None:
    """Refuse (422) an adapter vLLM cannot serve on `base`: too high a rank, or trained on another base.

    Three independent signs of another base, each cheap:
    1. align_meta.json's base_fingerprint disagrees with the base's config.json (architecture, sizes);
    2. the adapter does not hold exactly the LoRA tensors its config implies on the base's linears;
    3. the folder recorded in adapter_config.json's base_model_name_or_path exists here, is not the
       served folder, and holds different weights (content_digest).
    """
    where = adapter.path
    if adapter.rank > max_rank:
        hint = f"restart with --max_lora_rank {vllm_max_lora_rank([adapter.rank])}" \
            if adapter.rank <= 512 else "vLLM serves ranks up to 512"
        raise AdapterRefused(422, f"{where}: rank {adapter.rank} exceeds this server's --max_lora_rank {max_rank}; "
                                  f"{hint}")
    with refused(422):
        check_fingerprint(adapter.meta, base.fingerprint(), where, f"the served base {base.path}")
        check_tensors(adapter.config, adapter.shapes, header_linears(base.shapes), where / WEIGHTS,
                      f"the served base {base.path}")
        check_finite((adapter.snapshot or where) / WEIGHTS, where / WEIGHTS)  # the copy vLLM will read
    other = _recorded_base(adapter.config.get("base_model_name_or_path"))
    if other is not None and other != base.path and weight_files(other):
        try:
            differs = content_digest(other) != base.digest
        except (OSError, ValueError):  # unreadable or odd files: the first two checks still hold
            differs = False
        if differs:
            raise AdapterRefused(422, f"{where}: trained on another base: {CONFIG} base_model_name_or_path "
                                      f"{other} holds different weights than the served base {base.path}")


def _recorded_base(recorded: object) -> Path | None:
    """The folder an adapter's config names as its base, when that is an existing folder here."""
    if not isinstance(recorded, str) or not recorded or "\0" in recorded:
        return None
    try:
        path = Path(recorded).resolve()
        return path if path.is_dir() else None
    except (OSError, ValueError, RuntimeError):
        return None


def resolve_in_folder(requested: str, folder: Path) -> Path:
    """The adapter path a runtime load asked for, if it lies inside `folder` (symlinks followed); else 403."""
    root = folder.resolve()
    candidate = Path(requested)
    if not candidate.is_absolute():
        candidate = root / candidate
    try:
        real = Path(os.path.realpath(candidate))
    except (OSError, ValueError) as e:
        raise AdapterRefused(400, f"adapter path {short(requested)}: cannot be resolved ({e})") from None
    if not inside(real, root):
        raise AdapterRefused(403, f"adapter path {short(requested)} is outside the allowed folder {root} "
                                  f"(--adapter_dir)")
    return real
