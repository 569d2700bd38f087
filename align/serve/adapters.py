"""What `align serve` checks before an adapter reaches vLLM.

vLLM loads whatever folder it is given; these checks turn a wrong folder into a clear 4xx message
instead of a 500 or, worse, an adapter silently applied to a base it was not trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from align.adapter_files import (
    PEFT_PREFIX,
    BaseInfo,
    content_digest,
    read_json_object,
    safetensors_shapes,
    vllm_max_lora_rank,
    weight_files,
)


class AdapterRefused(Exception):
    """An adapter that must not be served; `status` is the HTTP code the proxy answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# -- reading folders -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise AdapterRefused(400, str(e)) from None


@dataclass
class AdapterInfo:
    path: Path
    rank: int
    config: dict
    meta: dict | None


def read_adapter(path: str | os.PathLike) -> AdapterInfo:
    """Read a PEFT adapter folder; AdapterRefused(404/400) when it is missing or not one."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterRefused(404, f"no adapter folder at {path}")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterRefused(404, f"{path}: not a PEFT adapter (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        raise AdapterRefused(404, f"{path}: no adapter_model.safetensors (only safetensors adapters are served)")
    config = _read_json(config_file)
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterRefused(400, f"{config_file}: field 'r': expected a positive integer, got {rank!r}")
    meta_file = path / "align_meta.json"
    meta = _read_json(meta_file) if meta_file.is_file() else None
    return AdapterInfo(path, rank, config, meta)


# -- the checks ------------------------------------------------------------------------------------
def check_adapter(adapter: AdapterInfo, base: BaseInfo, max_rank: int) -> None:
    """Refuse (422) an adapter vLLM cannot serve on `base`: too high a rank, or trained on another base.

    Three independent signs of another base, each cheap:
    1. align_meta.json's base_fingerprint disagrees with the base's config.json (architecture, sizes);
    2. the adapter's LoRA matrices do not fit the base's weight shapes;
    3. the folder recorded in adapter_config.json's base_model_name_or_path exists here, is not the
       served folder, and holds different weights (content_digest).
    """
    where = adapter.path
    if adapter.rank > max_rank:
        raise AdapterRefused(422, f"{where}: rank {adapter.rank} exceeds this server's --max-lora-rank {max_rank}; "
                                  f"restart with --max-lora-rank {vllm_max_lora_rank([adapter.rank])}")
    fp = (adapter.meta or {}).get("base_fingerprint") or {}
    for key, served in base.fingerprint().items():
        if key in fp and served is not None and fp[key] != served:
            raise AdapterRefused(422, f"{where}: trained on another base: align_meta.json base_fingerprint.{key} "
                                      f"is {fp[key]!r}, the served base {base.path} has {served!r}")
    _check_shapes(adapter, base)
    recorded = adapter.config.get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        other = Path(recorded).resolve()
        if other != base.path and weight_files(other) and content_digest(other) != base.digest:
            raise AdapterRefused(422, f"{where}: trained on another base: adapter_config.json "
                                      f"base_model_name_or_path {recorded} holds different weights "
                                      f"than the served base {base.path}")


def _check_shapes(adapter: AdapterInfo, base: BaseInfo) -> None:
    # PEFT key "base_model.model.<module>.lora_A.weight" (r, in) / ".lora_B.weight" (out, r) belongs to the
    # base weight "<module>.weight" (out, in). Keys that map to no base weight (MoE fused experts) are skipped.
    for key, shape in safetensors_shapes(adapter.path / "adapter_model.safetensors").items():
        for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not key.endswith(part) or len(shape) != 2:
                continue
            module = key.removeprefix(PEFT_PREFIX)[: -len(part)]
            base_shape = base.shapes.get(module + ".weight")
            if base_shape is not None and len(base_shape) == 2 and shape[dim] != base_shape[dim]:
                raise AdapterRefused(422, f"{adapter.path}: trained on another base: {key} has shape {shape}, "
                                          f"which does not fit the served base's {module}.weight {base_shape}")


def resolve_in_folder(requested: str, folder: Path) -> Path:
    """The adapter path a runtime load asked for, if it lies inside `folder` (symlinks followed); else 403."""
    root = folder.resolve()
    candidate = Path(requested)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = candidate.resolve()
    if real != root and root not in real.parents:
        raise AdapterRefused(403, f"adapter path {requested} is outside the allowed folder {root} (--adapter-dir)")
    return real
