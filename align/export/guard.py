"""What `align export` checks before any model loads: the output can never touch the source, and
the source is whole.

The output is refused when it is, is inside or contains the folder exported, its training run
folder or the base (symlinks resolved): the atomic write replaces the output folder, so any overlap
would delete what is being exported. An output that is a file is refused, and a non-empty output
folder needs --overwrite, as training's output folder does (align/train/run_folder.py). A damaged
source (bad JSON, a truncated safetensors file, a head of the wrong shape) is one line naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from align.core.errors import UserError
from align.serve.adapters import AdapterInfo, AdapterRefused, parse_json_object, read_adapter
from align.serve.adapters import read_safetensors_header as read_header
from align.serve.fs import JSON_FILE_LIMIT, read_regular
from align.train.run_folder import RUN_MARKERS, check_deletable, check_not_a_file, check_writable


class ExportRefused(UserError):
    """The output would touch the source, or the source is damaged: nothing was loaded or written."""


def real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def source_folders(source: Path, label: str) -> list[tuple[str, Path]]:
    """(label, resolved folder) for `source` and, when its parent holds a training run, that run folder."""
    src = real(source)
    run = src.parent
    if any((run / m).exists() for m in RUN_MARKERS):
        return [(label, src), (f"{label}'s run folder", run)]
    return [(label, src)]


def check_apart(out: Path, sources: list[tuple[str, Path]]) -> None:
    """Refuse an output that is, is inside or contains any of `sources` (resolved folders)."""
    target = real(out)
    for label, src in sources:
        if target == src:
            relation = "is"
        elif src in target.parents:
            relation = "is inside"
        elif target in src.parents:
            relation = "contains"
        else:
            continue
        raise ExportRefused(f"output {out} {relation} the {label} {src}; an export never writes over its source, "
                            f"choose an output folder apart from it")


def check_output(out: Path, sources: list[tuple[str, Path]], overwrite: bool) -> None:
    """The output folder policy: apart from the sources, not a file, empty unless --overwrite."""
    check_apart(out, sources)
    check_not_a_file(out, "output", "new or empty")
    check_writable(out, "output", beside=True)  # written as a temporary beside it, then renamed
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (f", ... ({len(held)} entries)" if len(held) > 3 else "")
        raise ExportRefused(f"output: {out} already holds files ({shown}); pass --overwrite to replace it")
    if held:
        check_deletable(out, "an output folder")


def checked_adapter(folder: Path, flag: str) -> AdapterInfo:
    """The PEFT adapter in `folder`, its config, weights header and align_meta.json checked."""
    try:
        return read_adapter(folder)
    except AdapterRefused as e:
        raise ExportRefused(f"{flag}: {e.message}") from None


def read_object(path: Path) -> dict:
    """A small JSON object file; ExportRefused naming it when it is missing, not JSON or not an object."""
    try:
        return parse_json_object(read_regular(path, None, path.name, JSON_FILE_LIMIT), path)
    except AdapterRefused as e:
        raise ExportRefused(e.message) from None


def check_reward_meta(path: Path) -> dict:
    """reward_meta.json, with the fields the export reads checked."""
    meta = read_object(path)
    template, length = meta.get("chat_template", True), meta.get("max_length")
    if not isinstance(template, bool):
        raise ExportRefused(f"{path}: field 'chat_template': expected true or false, got {template!r}")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise ExportRefused(f"{path}: field 'max_length': expected a positive integer or null, got {length!r}")
    return meta


def check_head(path: Path, hidden_size: int) -> None:
    """head.safetensors: a whole file holding weight (1, hidden_size) and, in older folders, bias (1,)."""
    if not path.is_file():
        raise ExportRefused(f"{path}: missing; a reward model folder holds its head there")
    try:
        shapes = read_header(path, None)
    except AdapterRefused as e:
        raise ExportRefused(e.message) from None
    if shapes not in ({"weight": [1, hidden_size]}, {"weight": [1, hidden_size], "bias": [1]}):
        raise ExportRefused(f"{path}: expected weight [1, {hidden_size}] (and, in older folders, bias [1]), "
                            f"got {shapes}")
