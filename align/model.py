"""One frozen base model carrying named LoRA adapters.

The policy, the reference (adapters switched off), the critic and the reward
model are all views of the same base weights: `SharedBase` owns the only copy
and switches which adapter is active. Only adapter tensors (and small heads
owned by the callers) ever require gradients.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from align.atomic import atomic_dir
from align.errors import UserError
from align.lora_forward import use_lean_lora_forward

DEFAULT_RANK = 8
DEFAULT_ALPHA = 32
# Ranks the design recommends for RL/preference tuning; others work but are warned about.
RECOMMENDED_RANKS = range(4, 9)


@dataclass
class LoraSettings:
    """How an adapter is shaped. `targets="all"` means every linear layer of every block."""

    rank: int = field(default=DEFAULT_RANK, metadata={"help": "LoRA rank r (4-8 recommended for RL and DPO)."})
    alpha: int = field(
        default=DEFAULT_ALPHA,
        metadata={"help": "LoRA alpha; the update is scaled by alpha/r. Keep it fixed (32) and tune the lr."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    targets: str | list[str] = field(
        default="all",
        metadata={"help": "'all' (attention, MLP and MoE experts of every block) or a list of module names."},
    )

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank: expected a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha: expected a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: expected a number in [0, 1), got {self.dropout}")
        if self.targets != "all" and not (
            isinstance(self.targets, list) and self.targets and all(isinstance(t, str) for t in self.targets)
        ):
            raise ValueError(f"lora.targets: expected 'all' or a non-empty list of module names, got {self.targets!r}")


def _is_router(parent: nn.Module) -> bool:
    # A MoE block holds `experts` next to its router; the router must stay frozen.
    return hasattr(parent, "experts")


def lora_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """Find what "all layers" means for this model.

    Returns `(target_modules, target_parameters)`: the leaf names of every
    `nn.Linear` inside the decoder blocks (attention q/k/v/o, MLP gate/up/down,
    unfused experts), and the fused 3-D expert tensors of MoE blocks (PEFT's
    `target_parameters`). Routers, embeddings and lm_head are excluded.
    """
    modules: set[str] = set()
    parameters: set[str] = set()
    named = dict(model.named_modules())
    for name, module in named.items():
        if ".layers." not in f".{name}" and not name.startswith("layers."):
            continue
        parent_name, _, leaf = name.rpartition(".")
        if isinstance(module, nn.Linear):
            if _is_router(named.get(parent_name, nn.Module())):
                continue
            modules.add(leaf)
        elif leaf == "experts":
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 3:
                    # e.g. "mlp.experts.gate_up_proj": suffix-matched against full parameter names.
                    parameters.add(f"{parent_name.rpartition('.')[2]}.experts.{pname}")
    if not modules and not parameters:
        raise ValueError(f"no linear layers found in {type(model).__name__}: cannot place LoRA adapters")
    # A router named like an MLP projection would be caught by leaf-name matching; refuse to guess.
    routers = {n.rpartition(".")[2] for n, m in named.items() if isinstance(m, nn.Linear)
               and _is_router(named.get(n.rpartition(".")[0], nn.Module()))}
    clash = routers & modules
    if clash:
        raise ValueError(f"router and expert layers share the names {sorted(clash)}; pass lora.targets explicitly")
    return sorted(modules), sorted(parameters)


def peft_config(all_targets: tuple[list[str], list[str]], lora: LoraSettings):
    """PEFT config for `lora`; `all_targets` is `lora_targets(model)` taken before any adapter exists."""
    from peft import LoraConfig

    if lora.targets == "all":
        modules, parameters = all_targets
    else:
        modules, parameters = list(lora.targets), []
    # Leaf names would also match outside the blocks; anchor them to the decoder layers.
    regex = r".*\.layers\.\d+\.(?:.*\.)?(?:" + "|".join(modules) + r")$"
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=regex,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


# "name" or "org/name" as the hub spells repository ids; a path ("./x", "/x", "a/b/c") is not one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?")


def resolve_model(name: str) -> str:
    """Where to load the model called `name` from; every recipe and CLI resolves `model:` here.

    'smollm2' -> the offline SmolLM2-135M-Instruct folder (built from its PyPI wheel on first
    use); an existing local folder -> itself; a hub id ("org/name" or "name") -> unchanged, for
    transformers to resolve from its cache or the hub. Anything else is a path that does not exist.
    """
    if name == "smollm2":
        from align.smollm import ensure_smollm2

        return str(ensure_smollm2())
    if name and Path(name).is_dir():  # Path('') is the working directory
        return name
    if _HUB_ID.fullmatch(name) and ".." not in name:
        return name
    raise UserError(f"model_name_or_path: {name!r} is neither 'smollm2', an existing model folder, "
                    f"nor a hub id ('org/name')")


def resolve_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


@dataclass(frozen=True)
class FourBit:
    """QLoRA's frozen base: linear layers stored in 4 bits by bitsandbytes (transformers' BitsAndBytesConfig names)."""

    bnb_4bit_quant_type: str = "nf4"  # "nf4" (QLoRA's NormalFloat) or "fp4"
    bnb_4bit_use_double_quant: bool = True  # quantise the per-block scales too (~0.4 bit/weight less)
    bnb_4bit_compute_dtype: str = "bfloat16"  # what the 4-bit weights are dequantised to for each matmul

    def __post_init__(self):
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type: expected 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}")
        if self.bnb_4bit_compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"bnb_4bit_compute_dtype: expected float32, bfloat16 or float16, "
                             f"got {self.bnb_4bit_compute_dtype!r}")

    def bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=resolve_dtype(self.bnb_4bit_compute_dtype))


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # a broken install counts as missing
        raise UserError(f"load_in_4bit: needs the bitsandbytes package (pip install 'align[qlora]'): {e}") from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def saved_lora_settings(path: str | os.PathLike) -> LoraSettings:
    """An adapter folder's LoRA shape: align_meta.json's when present, else PEFT's adapter_config.json."""
    folder = Path(path)
    meta = folder / "align_meta.json"
    if meta.is_file():
        lora = json.loads(meta.read_text()).get("lora")
        if lora:
            return LoraSettings(**lora)
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = config.get("target_modules")
    return LoraSettings(rank=config["r"], alpha=config.get("lora_alpha", config["r"]),
                        dropout=config.get("lora_dropout", 0.0),
                        targets=targets if isinstance(targets, list) and targets else "all")


class SharedBase:
    """A frozen causal LM and its named LoRA adapters: the only copy of the base weights.

    - `adapter(name)`: context in which `name` is the active adapter.
    - `reference()`: context in which all adapters are off (the reference model).
    - `hidden(input_ids, attention_mask)`: final hidden states of whatever is active.
    """

    def __init__(self, model: nn.Module, tokenizer, name_or_path: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.load_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.trainable: set[str] = set()
        self.settings: dict[str, LoraSettings] = {}
        self.sharded = False  # FSDP (align/fsdp.py): this process holds slices of the base and adapters
        self.gathered: dict[str, dict] = {}  # FSDP: full copies of adapters, gathered for saving
        self.fingerprint_cache: dict | None = None
        # Taken from the plain model: once PEFT has injected layers, lora_A/lora_B are Linear too.
        self.all_targets = lora_targets(self._plain_model())
        for p in self.model.parameters():
            p.requires_grad_(False)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        name_or_path: str,
        dtype: str = "float32",
        device: str = "auto",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        checkpoint_keep_last: int = 0,
        load_in_4bit: FourBit | None = None,
    ) -> "SharedBase":
        """Load a causal LM once, frozen.

        `load_in_4bit`: store the decoder's linear weights in 4 bits (QLoRA); embeddings, norms and
        lm_head keep `dtype`. Adapters still train in float32 and save in the usual PEFT format.
        `gradient_checkpointing`: recompute each decoder layer's activations in backward
        instead of keeping them; `checkpoint_keep_last` layers at the top keep theirs
        (see `checkpoint_layers`). `device`: auto (a CUDA GPU when present, else the CPU), cpu, cuda[:N].
        """
        from transformers import AutoModelForCausalLM

        from align.distributed import resolve_device

        if device == "auto":
            device = resolve_device(device)

        kwargs = {}
        if load_in_4bit is not None:
            require_bitsandbytes()
            kwargs = {"quantization_config": load_in_4bit.bnb_config(), "device_map": {"": device}}
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True,
            **kwargs)
        if load_in_4bit is None:
            model = model.to(device)
        model.config.use_cache = False
        base = cls(model, load_tokenizer(name_or_path, trust_remote_code), str(name_or_path))
        base.load_dtype = dtype
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.checkpoint_layers(keep_last=checkpoint_keep_last)
        return base

    def checkpoint_layers(self, keep_last: int = 0) -> int:
        """Under gradient checkpointing, let the last `keep_last` decoder layers keep their activations.

        A checkpointed layer runs its forward twice per step (once more in backward). Keeping
        a few layers' activations trades a little memory for that time: a layer's activations are
        ~13 x tokens x hidden floats (SmolLM2-135M, 4 pairs x ~58 tokens: ~6 MB a layer; 8 of 30
        layers cost ~45 MB and made steps ~9% faster, scripts/bench/dpo.py). Returns the number of
        layers still checkpointed.
        """
        from transformers.modeling_layers import GradientCheckpointingLayer

        if keep_last < 0:
            raise ValueError(f"checkpoint_keep_last: expected a number of layers >= 0, got {keep_last}")
        layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not any(layer.gradient_checkpointing for layer in layers):
            raise ValueError("checkpoint_keep_last needs gradient checkpointing on (gradient_checkpointing: true)")
        cut = max(0, len(layers) - keep_last)
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < cut
        return cut

    @property
    def peft(self):
        from peft import PeftModel

        return self.model if isinstance(self.model, PeftModel) else None

    @property
    def adapters(self) -> list[str]:
        return list(self.peft.peft_config) if self.peft is not None else []

    def add_adapter(self, name: str, lora: LoraSettings | None = None, trainable: bool = True) -> None:
        """Attach a freshly initialised adapter (B = 0, so it starts equal to the base)."""
        from peft import get_peft_model

        lora = lora or LoraSettings()
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this base")
        config = peft_config(self.all_targets, lora)
        if self.peft is None:
            self.model = get_peft_model(self.model, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)
        self.settings[name] = lora
        use_lean_lora_forward(self.model)
        if trainable:
            self.trainable.add(name)
        self.set_active(name)

    def load_adapter(self, name: str, path: str | os.PathLike, trainable: bool = False) -> None:
        """Attach a saved PEFT adapter (safetensors only) under `name`."""
        from peft import PeftModel

        path = Path(path)
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: expected a PEFT adapter folder with adapter_model.safetensors")
        was_training = self.model.training  # PEFT switches the whole model to eval when loading a frozen adapter
        if self.peft is None:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=trainable)
        else:
            self.peft.load_adapter(path, adapter_name=name, is_trainable=trainable)
        self.model.train(was_training)
        use_lean_lora_forward(self.model)
        self.settings.setdefault(name, saved_lora_settings(path))
        if trainable:
            self.trainable.add(name)
        self.set_active(name)

    def check_adapter_base(self, path: str | os.PathLike, field: str) -> None:
        """Refuse an adapter folder saved for another base (its align_meta.json fingerprint, when it has one)."""
        meta_path = Path(path) / "align_meta.json"
        if not meta_path.is_file():
            return
        try:
            saved = json.loads(meta_path.read_text()).get("base_fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{field}: {meta_path} is not a valid JSON object") from None
        if not saved:
            return
        mine = self.fingerprint()
        diff = [k for k in mine if saved.get(k) != mine[k]]
        if diff:
            raise UserError(f"{field}: {path} was trained on another base ({diff[0]}: {saved.get(diff[0])!r}, "
                            f"this base has {mine[diff[0]]!r}); expected an adapter of {self.name_or_path}")

    def _plain_model(self) -> nn.Module:
        return self.peft.get_base_model() if self.peft is not None else self.model

    # -- switching ----------------------------------------------------------------------------
    def set_active(self, name: str) -> None:
        peft = self.peft
        if peft is None or name not in peft.peft_config:
            raise KeyError(f"no adapter named {name!r}; this base has {self.adapters}")
        if peft.active_adapter != name:
            peft.set_adapter(name)
        self._restore_requires_grad()

    def _restore_requires_grad(self) -> None:
        # PEFT's set_adapter freezes every adapter but the active one; several may be training at once.
        for pname, p in self.model.named_parameters():
            p.requires_grad_(any(f".{a}." in pname or pname.endswith(f".{a}") for a in self.trainable)
                             and "lora_" in pname)

    @contextmanager
    def adapter(self, name: str):
        previous = self.peft.active_adapter if self.peft is not None else None
        self.set_active(name)
        try:
            yield self
        finally:
            if previous is not None and previous != name:
                self.set_active(previous)

    @contextmanager
    def reference(self):
        """The reference model: the same base with every adapter switched off."""
        if self.peft is None:
            yield self
            return
        with self.peft.disable_adapter():
            yield self

    # -- forward ------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self._plain_model().get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self._plain_model().get_output_embeddings()

    @property
    def hidden_size(self) -> int:
        return self._plain_model().config.hidden_size

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, H) with the active adapter; works for left or right padding."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
        return out.last_hidden_state

    # -- parameters ---------------------------------------------------------------------------
    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n and f".{name}" in n
                and (f".{name}." in n or n.endswith(f".{name}"))}

    def base_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if "lora_" not in n}

    def base_bytes(self) -> int:
        """Bytes of base weights in memory, counted by distinct storage (tied weights once)."""
        seen: dict[int, int] = {}
        for p in self.base_parameters().values():
            s = p.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    def fingerprint(self) -> dict:
        """Identify the base: architecture, shapes and a hash of a few weights."""
        if self.fingerprint_cache is not None:  # taken before sharding (the base is frozen)
            return dict(self.fingerprint_cache)
        model = self._plain_model()
        h = hashlib.sha256()
        # Names as in the plain model, so the fingerprint does not change when adapters are added
        # (PEFT renames wrapped layers to base_model.model.<name>.base_layer.weight).
        params = sorted((n.replace(".base_layer", ""), p) for n, p in model.named_parameters()
                        if "lora_" not in n)
        for n, p in params[:: max(1, len(params) // 8)]:
            h.update(n.encode())
            h.update(self._unquantised(n, p).float().flatten()[:4096].cpu().numpy().tobytes())
        return {
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "model_type": model.config.model_type,
            "hidden_size": model.config.hidden_size,
            "num_hidden_layers": model.config.num_hidden_layers,
            "vocab_size": model.config.vocab_size,
            "weights_sha256": h.hexdigest(),
        }

    @property
    def quantized(self) -> bool:
        return bool(getattr(self._plain_model(), "is_loaded_in_4bit", False))

    def _unquantised(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """`p` as the unquantised base holds it: a 4-bit weight is read back from the checkpoint.

        So a 4-bit base and its full-precision original share one fingerprint, and adapters trained
        on the former load onto (and serve on) the latter.
        """
        if not self.quantized or p.dtype != torch.uint8:
            return p.detach()
        from safetensors import safe_open

        for f in sorted(Path(self.name_or_path).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                if name in st.keys():
                    return st.get_tensor(name).to(resolve_dtype(self.load_dtype))
        raise ValueError(f"{self.name_or_path}: no safetensors file holds {name}; cannot fingerprint the 4-bit base")

    def save_adapter(self, name: str, path: str | os.PathLike) -> Path:
        """Write adapter `name` as a PEFT folder (safetensors), atomically, with the base fingerprint."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            # Sharded (FSDP): the full copies every process gathered (align.fsdp.gathered_adapters).
            full = {"state_dict": self.gathered[name]} if self.sharded else {}
            self.peft.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True, **full)
            # PEFT nests non-default adapters in a subfolder; flatten so the folder is the adapter.
            nested = tmp / name
            if nested.is_dir():
                for f in nested.iterdir():
                    f.rename(tmp / f.name)
                nested.rmdir()
            meta = {"adapter": name, "base": self.name_or_path, "base_fingerprint": self.fingerprint()}
            if name in self.settings:
                meta["lora"] = asdict(self.settings[name])
            (tmp / "align_meta.json").write_text(json.dumps(meta, indent=2))
        return path
