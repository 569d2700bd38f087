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
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from align.core.atomic import atomic_dir
from align.core.loading import FourBit, load_tokenizer, require_bitsandbytes, resolve_dtype
from align.core.lora import LoraSettings, lora_target_groups, peft_config, saved_lora_settings, select_targets
from align.core.lora_forward import use_lean_lora_forward
from align.core.packing import check_packed_attention, pack_batch, unpack_tokens


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
        self.sharded = False  # FSDP (align/core/fsdp.py): this process holds slices of the base and adapters
        self.gathered: dict[str, dict] = {}  # FSDP: full copies of adapters, gathered for saving
        self.fingerprint_cache: dict | None = None
        # Taken from the plain model: once PEFT has injected layers, lora_A/lora_B are Linear too.
        self.target_groups = lora_target_groups(self._plain_model())
        self.all_targets = select_targets(self.target_groups, "all", type(self._plain_model()).__name__)
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

        from align.core.distributed import resolve_device

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
        plain = self._plain_model()
        config = peft_config(self.target_groups, lora, getattr(plain.config, "num_hidden_layers", None),
                             type(plain).__name__)
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
        """Verify an adapter folder before it is loaded here: whole files, exactly the LoRA tensors its config
        implies on this base's linears, and its align_meta.json fingerprint (align.core.adapter_verify)."""
        from align.core.adapter_verify import AdapterInvalid, model_linears, verify_adapter

        try:
            verify_adapter(path, model_linears(self._plain_model()), self.fingerprint(),
                           f"the base {self.name_or_path}")
        except AdapterInvalid as e:
            raise AdapterInvalid(f"{field}: {e}") from None

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

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, padding_free: bool = False,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, H) with the active adapter; works for left or right padding.

        `padding_free`: the rows' tokens run as one packed row without padding (align/core/packing.py) and come
        back in the (B, T, H) layout, zero at padding. `position_ids`: rows already packed (SFT's packing).
        """
        if padding_free:
            packed = pack_batch(input_ids, attention_mask, position_ids)
            out = self.decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
            return unpack_tokens(out.last_hidden_state[0], packed)
        if position_ids is not None:
            # Packed rows without a 2-D mask: transformers builds one causal block per restart at 0.
            return self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
        return out.last_hidden_state

    def check_padding_free(self) -> None:
        """Raise UserError unless packed rows keep their sequences apart on this model (align/core/packing.py)."""
        config = self._plain_model().config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        check_packed_attention(self.decoder, text.vocab_size, f"{self.name_or_path} ({config.model_type})")

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
            # Sharded (FSDP): the full copies every process gathered (align.core.fsdp.gathered_adapters).
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
