"""Starting a trained policy from a saved adapter (e.g. an SFT run's `adapter/`), and what it is anchored to.

    init_adapter: runs/sft/adapter   # the trained adapter starts equal to this PEFT folder
    reference: init                  # (default with init_adapter) the reference is that starting policy
    reference: base                  # the reference is the bare base, adapters off

With `reference: init` the reference is a frozen copy of the adapter loaded under another name
on the same PEFT model: one base in memory, two small adapters. Without init_adapter the policy starts at zero and the reference is the bare base.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from align.core.adapter_verify import AdapterInvalid, read_adapter_files

REFERENCE_ADAPTER = "reference"
REFERENCES = ("init", "base")


def check_init_fields(config) -> None:
    """Validate `init_adapter` and `reference` on a config, before any model loads; fills in the default."""
    if config.reference not in (None, *REFERENCES):
        raise ValueError(f"reference: expected one of {list(REFERENCES)} (or null), got {config.reference!r}")
    if config.init_adapter is None:
        if config.reference == "init":
            raise ValueError("reference: 'init' needs init_adapter (the adapter folder the policy starts from)")
        config.reference = "base"
        return
    check_adapter_folder(config.init_adapter, "init_adapter")
    if config.reference is None:
        config.reference = "init"


def check_adapter_folder(path: str, field: str) -> None:
    """A PEFT adapter folder: adapter_config.json and safetensors weights (never a pickle)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{field}: {path} is not a folder; expected a PEFT adapter folder (e.g. an SFT run's "
                         f"adapter/)")
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{field}: {path} has no adapter_config.json; expected a PEFT adapter folder")
    if not (folder / "adapter_model.safetensors").is_file():
        extra = " (only safetensors weights are loaded)" if (folder / "adapter_model.bin").exists() else ""
        raise ValueError(f"{field}: {path} has no adapter_model.safetensors{extra}")
    # The file-level checks need no model: a broken adapter is refused before the base loads
    # (a ValueError, as every config check, so the config loader names the YAML line).
    try:
        read_adapter_files(folder)
    except AdapterInvalid as e:
        raise ValueError(f"{field}: {e}") from None


def attach_policy(base, name: str, lora, init_adapter: str | None, reference: str) -> str | None:
    """Add the trained adapter `name` (fresh, or a copy of init_adapter) and, for reference=init, its
    frozen twin. Returns the reference adapter's name, or None when the reference is the bare base."""
    if init_adapter is None:
        if name not in base.adapters:
            base.add_adapter(name, lora)
        base.set_active(name)
        return None
    # Verified against this base's linears and fingerprint before PEFT loads it (PEFT only warns).
    base.check_adapter_base(init_adapter, "init_adapter")
    if name not in base.adapters:
        base.load_adapter(name, init_adapter, trainable=True)
    ref = None
    if reference == "init":
        ref = REFERENCE_ADAPTER
        if ref not in base.adapters:
            base.load_adapter(ref, init_adapter, trainable=False)
    base.set_active(name)
    return ref


def reference_context(base, ref_adapter: str | None):
    """The reference model: the frozen init adapter, or the base with adapters off."""
    if ref_adapter is None:
        return base.reference()
    return base.adapter(ref_adapter)


@contextmanager
def reference_model(base, ref_adapter: str | None, ref_copy=None):
    """The SharedBase to score the reference with, set up as `reference_context` says: `ref_copy` where a run keeps
    a second model (a frozen copy of the starting base under full fine-tuning, or DPO's ref_model_copy carrying
    the init adapter under the same name), else `base` itself. On a copy, adapters it carries for other roles
    (PPO's critic) are off."""
    model = base if ref_copy is None else ref_copy
    with reference_context(model, ref_adapter):
        yield model
