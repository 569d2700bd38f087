"""FSDP: the frozen base sharded over the processes (`accelerate launch --config_file configs/accelerate/fsdp.yaml`).

Each decoder layer, the input embedding, the decoder and the LM head become FSDP2 units (torch's
`fully_shard`): a process keeps 1/N of every base tensor and all-gathers a unit's full weights only
while that unit runs. LoRA tensors live inside the layers they adapt, so they are sharded with them
and FSDP reduce-scatters (averages) their gradients itself; tensors outside the base (a reward head)
stay whole on every process and are averaged by `Processes.average_gradients`, as under DDP.

Why these units and not the root model: the recipes call the decoder and read the LM head's weight
themselves (align/core/logprobs.py, align/recipes/sft.py), never the model's own forward. So the decoder is the
root FSDP sees, and the LM head, whose forward never runs, is gathered where its weight is read
(`full_tensor`). Every process must therefore run the same forwards: evaluation too runs everywhere.

Saving: every process all-gathers full copies of the trained tensors and the main one writes them,
so the files are those of a 1-process run. Loading: each process keeps its slice of what it reads.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from align.core.errors import UserError


def fsdp_launched() -> bool:
    """Whether accelerate launched this process with an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(t) -> bool:
    return hasattr(t, "full_tensor")  # a DTensor; no import, so plain runs never load torch.distributed.tensor


def full_tensor(t):
    """The whole of `t`: a sharded tensor is all-gathered (every process must call this), any other is itself."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor; any other tensor is itself."""
    return t.to_local() if is_sharded(t) else t


def local_bytes(params) -> int:
    return sum(local(p).numel() * p.element_size() for p in params)


def refuse_unsupported(config, recipe: str, ready: bool) -> None:
    """What FSDP here does not do, refused in one line before anything loads (docs/scaling.md)."""
    if not ready:
        raise UserError(f"{recipe} with FSDP is not supported: its rollouts run the model's own forward and engines "
                        f"that load the whole base; use configs/accelerate/ddp.yaml (docs/scaling.md)")
    env = os.environ.get
    if env("FSDP_VERSION", "2") != "2":
        raise UserError("FSDP: align shards with FSDP2; set fsdp_version: 2 in the accelerate config")
    if env("FSDP_OFFLOAD_PARAMS", "false") == "true":
        raise UserError("fsdp_offload_params: true is not supported here (the shards stay on the device); set it false")
    if env("FSDP_ACTIVATION_CHECKPOINTING", "false") == "true":
        raise UserError("fsdp_activation_checkpointing: use the recipe's gradient_checkpointing: true instead "
                        "(align checkpoints the decoder layers itself); set it false in the accelerate config")
    if getattr(config, "four_bit", None) is not None:
        raise UserError("load_in_4bit with FSDP: a 4-bit (bitsandbytes) base cannot be sharded here; "
                        "use configs/accelerate/ddp.yaml for QLoRA")
    if getattr(config, "ref_model_copy", False):
        raise UserError("ref_model_copy with FSDP: the copy would be a second whole base on every process; "
                        "leave it off (the reference is the sharded base with the adapter off)")


def units(base) -> list[nn.Module]:
    """The modules that become FSDP units, innermost first: decoder layers, input embedding, decoder, LM head."""
    decoder = base.decoder
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UserError(f"FSDP: {type(decoder).__name__} has no `layers` list of decoder layers to shard")
    embed, head = decoder.get_input_embeddings(), base.lm_head
    found = [*layers, embed, decoder]
    if head.weight is not embed.weight:  # a tied LM head is the embedding: sharded once, with it
        found.append(head)
    return found


def shard_base(base, processes, groups: list[dict], heads: dict[str, nn.Module]) -> list[dict]:
    """Shard `base` over the processes in place; returns `groups` with the sharded parameters.

    fully_shard replaces every parameter it manages by a new (sharded) one, so the optimizer's groups,
    built on the old ones, are re-pointed by name. Tensors outside the base (heads) are kept as given,
    moved to this process's device (the base was loaded on the CPU; fully_shard moves only slices).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base.fingerprint_cache = base.fingerprint()  # read from whole weights, once: the base never changes
    names = {id(p): n for n, p in base.model.named_parameters()}
    full = base_bytes(base)
    mesh = init_device_mesh(torch.device(processes.device).type, (processes.world,))
    tied = base.lm_head.weight is base.decoder.get_input_embeddings().weight
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true") != "false"  # fsdp_reshard_after_forward
    for module in units(base):
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    if tied:  # the LM head keeps pointing at the embedding's new, sharded weight
        base.lm_head.weight = base.decoder.get_input_embeddings().weight
    stray = [n for n, t in (*base.model.named_parameters(), *base.model.named_buffers())
             if not is_sharded(t) and t.device.type != mesh.device_type]
    if stray:  # a module outside the units would stay on the CPU it was loaded on
        raise UserError(f"FSDP: {stray[0]} lies outside the decoder and LM head that align shards ({len(stray)} "
                        f"such tensors); this architecture is not supported under FSDP")
    base.sharded = True
    base.shard_bytes = (base_bytes(base), full)
    print(f"[align] FSDP: process {processes.rank} holds {base.shard_bytes[0]} of the base's {full} bytes",
          flush=True)
    for head in heads.values():
        head.to(processes.device)
    now = dict(base.model.named_parameters())
    return [{**g, "params": [now[names[id(p)]] if id(p) in names else p for p in g["params"]]} for g in groups]


def base_bytes(base) -> int:
    """Bytes of base weights this process holds (its slices, once sharded)."""
    return local_bytes(base.base_parameters().values())


@contextmanager
def gathered_adapters(base, names: list[str]):
    """Under FSDP, every process gathers full copies of adapters `names`; inside, `save_adapter` writes those.

    A no-op for an unsharded base. Every process must enter it (all-gathers), the main one then writes.
    """
    if not getattr(base, "sharded", False):
        yield
        return
    base.gathered = {a: {n: full_tensor(p.detach()).cpu() for n, p in base.adapter_parameters(a).items()}
                     for a in names}
    try:
        yield
    finally:
        base.gathered = {}


@torch.no_grad()
def load_full_adapter(base, name: str, weights: dict, where) -> None:
    """Copy a saved adapter's full tensors (PEFT names) into the sharded live adapter `name`: each process its slice."""
    from torch.distributed.tensor import distribute_tensor

    for n, p in base.adapter_parameters(name).items():
        key = n.replace(f".{name}", "")  # PEFT saves names without the adapter's
        if key not in weights:
            raise UserError(f"{where}: adapter tensor {key} is missing for adapter {name!r}")
        t = weights[key].to(device=p.device, dtype=p.dtype)
        p.copy_(distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None) if is_sharded(p) else t)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading full optimizer state, keep of each sharded parameter's moments this process's slice."""
    from torch.distributed.tensor import distribute_tensor

    for p, state in optimizer.state.items():
        if not is_sharded(p):
            continue
        for k, v in state.items():
            if torch.is_tensor(v) and not is_sharded(v) and v.shape == p.shape:
                state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, comm_device: torch.device) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over sharded and whole gradients: the slices' squares summed over the
    processes, whole (replicated) gradients counted once. Returns the total norm (a plain tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64, device=comm_device)
    for g in grads:
        if is_sharded(g):
            squares += local(g).double().pow(2).sum().to(comm_device)
    torch.distributed.all_reduce(squares)
    for g in grads:
        if not is_sharded(g):
            squares += g.double().pow(2).sum().to(comm_device)
    total = squares.sqrt().float()
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    for g in grads:
        local(g).mul_(coef)
    return total
