"""The processes a run is spread over, and the little communication data parallelism needs.

`python -m align ...` is one process; `accelerate launch -m align ...` starts N, and accelerate
sets up the process group (NCCL on GPUs, gloo on CPUs). Every process holds the whole frozen
base and the same adapters; each takes its shard of every global batch, and after the last
micro-batch of a step the gradients of the *trained* tensors only (adapters and heads: a few MB)
are averaged in one all-reduce of a flat buffer. The frozen base is never communicated
(docs/scaling.md, "How a step is shared"). Under an FSDP launch the base is sharded instead
(align/core/fsdp.py) and FSDP reduces the adapters' gradients; the all-reduce here keeps the rest.

Why not DDP around the model: the recipes call parts of the base (the decoder, the LM head,
several adapters in one step) rather than one forward of a wrapped module, and DDP's reducer
needs exactly that one forward per backward. Averaging the trained gradients once per optimizer
step is what DDP with `no_sync` during accumulation would do, in one collective.
"""

from __future__ import annotations

import os
import sys

import torch

from align.core.fsdp import fsdp_launched, is_sharded


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch / torchrun) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def resolve_device(requested: str, local_rank: int = 0, processes: int = 1) -> str:
    """`device:` as configured -> the device this process uses.

    auto: the process's GPU when CUDA is present, else the CPU. With several processes each
    takes the GPU of its local rank; a fixed `cuda:N` would put them all on one GPU, so it is refused.
    """
    from align.core.errors import UserError

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"device: {requested} but no CUDA GPU is visible here; use device: auto or cpu")
        if requested == "cuda":
            return f"cuda:{local_rank}" if processes > 1 else "cuda"
        if processes > 1:
            raise UserError(f"device: {requested} would put all {processes} processes on one GPU; use device: "
                            f"auto (each process takes the GPU of its local rank)")
        return requested
    raise UserError(f"device: expected auto, cpu, cuda or cuda:N, got {requested!r}")


class Processes:
    """This process's place among the run's processes, and the collectives the Trainer uses.

    One process (no launcher): every method is a no-op, and accelerate is never imported.
    """

    def __init__(self, device: str = "auto"):
        self.world = launched_processes()
        self.rank = 0
        self.local_rank = 0
        self.allreduce_bytes = 0  # bytes this process sent into all-reduces in the last optimizer step
        if self.world > 1:
            from accelerate import PartialState

            # cpu=True makes accelerate use gloo (its MULTI_CPU mode) under a torchrun-style launcher.
            cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            state = PartialState(cpu=cpu)
            self.state = state
            self.world = state.num_processes
            self.rank = state.process_index
            self.local_rank = state.local_process_index
        self.device = resolve_device(device, self.local_rank, self.world)
        # FSDP launch (configs/accelerate/fsdp.yaml): the Trainer shards the base (align/core/fsdp.py).
        self.fsdp = self.world > 1 and fsdp_launched()
        if self.fsdp:
            # Every process reads the checkpoint itself (safetensors are memory-mapped: one copy in the page
            # cache) and keeps its slice. transformers' rank-0-only loading would leave the others with zeros
            # that only accelerate's own FSDP wrapping broadcasts over, which align does not use.
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def shard(self, items: list) -> list:
        """This process's share of one global batch's list (micro-batches, prompts): every world-th item."""
        if len(items) % self.world:
            raise ValueError(f"{len(items)} items cannot be shared evenly by {self.world} processes")
        return items[self.rank::self.world]

    def average_gradients(self, params: list[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Average the gradients of `params` over the processes, in place, in one all-reduce.

        `extra` (a small float vector, e.g. the step's statistics) rides along in the same buffer and
        comes back averaged. Parameters without a gradient count as zeros, as DDP treats unused ones.
        Sharded parameters (FSDP) are skipped: FSDP has averaged their gradients already.
        """
        params = [p for p in params if not is_sharded(p)]
        if not self.distributed:
            self.allreduce_bytes = 0
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        device = grads[0].device if grads else torch.device(self.device)
        parts = [g.detach().reshape(-1).float() for g in grads]
        if extra is not None:
            parts.append(extra.to(device=device, dtype=torch.float32).reshape(-1))
        flat = torch.cat(parts) if parts else torch.zeros(0, device=device)
        torch.distributed.all_reduce(flat)
        flat /= self.world
        self.allreduce_bytes = flat.numel() * flat.element_size()
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n
        return flat[offset:].cpu() if extra is not None else None

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over processes of each numeric value (every process must pass the same keys)."""
        if not self.distributed:
            return values
        keys = sorted(k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        t /= self.world
        return {**values, **dict(zip(keys, t.cpu().tolist()))}

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Make every process start from the main process's trained tensors (adapters, heads)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in params:
                if is_sharded(p):  # FSDP: each process holds a different slice, sharded from the same tensor
                    continue
                torch.distributed.broadcast(p.data, src=0)

    def all_agree(self, flag: bool) -> bool:
        """True only if `flag` is true on every process (one all-reduce; `flag` itself on one process)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self._comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    def _comm_device(self) -> torch.device:
        # NCCL only moves GPU tensors; gloo only CPU ones.
        return torch.device(self.device) if self.device.startswith("cuda") else torch.device("cpu")


def leave_launched_process(code: int) -> None:
    """End a process started by a launcher (accelerate/torchrun) with `code`, skipping C++ teardown.

    Tearing gloo down, by destroy_process_group or at interpreter exit, can abort a process whose run is
    complete ("terminate called without an active exception", SIGABRT) when its peer has already gone;
    the launcher then reports the run failed (seen in tests/test_fsdp.py under the full suite's load). By the time
    a recipe returns, train() has ended on a barrier and every file is written atomically, so nothing is
    left for the teardown to do: flush what Python buffers, then exit. A single process returns normally.
    """
    if launched_processes() <= 1:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
