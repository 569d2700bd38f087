"""One optimizer step over accumulated micro-batches, the building block of every recipe's update.

The lifecycle takes one such step per training step for DPO, SFT and reward models; PPO takes one
per minibatch of its epochs. Either way the same code accumulates, averages over processes, clips,
updates, checks that the update left everything finite, and moves the learning-rate schedule.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.core.errors import TrainingDiverged
from align.core.fsdp import clip_grad_norm, local
from align.train.run_folder import last_good


class GradientStep:
    """`step(micro_batches, loss_fn, step)`: accumulate, average over processes, clip, update, schedule.

    Holds the optimizer and its schedule, the processes, the base (sharded or not), the clipping norm
    and the run folder (what a diverged run names as its last good checkpoint).
    """

    def __init__(self, optimizer, scheduler, processes, base, max_grad_norm: float, out: Path):
        self.optimizer, self.scheduler, self.processes = optimizer, scheduler, processes
        self.base, self.max_grad_norm, self.out = base, max_grad_norm, out

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def __call__(self, micro_batches: list, loss_fn, step: int, global_micro_batches: int | None = None) -> dict:
        """Accumulate gradients over `micro_batches` (loss_fn(mb) -> (loss, stats)) for training step `step`
        (1-based, for messages), clip, update, schedule.

        Returns the micro-batch mean of the loss and of each statistic, plus grad_norm and the
        learning rate the update used. A non-finite loss or gradient stops the run before the update.
        On N processes `micro_batches` is this process's share of the step's `global_micro_batches`
        (default: N x as many); every micro-batch weighs 1/global in the loss, as on one process, and
        the trained tensors' gradients (and the statistics) are averaged over the processes.
        """
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        weight = self.processes.world / (global_micro_batches or len(micro_batches) * self.processes.world)
        sums, bad_loss = self.accumulate(micro_batches, loss_fn, weight, step)
        stats = self.average(sums, bad_loss, step)
        grad_norm = self.clip()
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"step {step}: the gradient norm is {grad_norm.item()}; stopped "
                                   f"before updating. {last_good(self.out)}")
        self.optimizer.step()
        self.check_finite(lr, step)
        self.scheduler.step()
        return {**stats, "grad_norm": grad_norm.item(), "learning_rate": lr}

    def accumulate(self, micro_batches: list, loss_fn, weight: float, step: int) -> tuple[dict, float | None]:
        """Backward through each micro-batch's weighted loss; returns the weighted sums of loss and
        statistics, and a non-finite loss met on this process of several (None if there was none)."""
        sums: dict[str, float] = {}
        bad_loss = None
        for mb in micro_batches:
            loss, stats = loss_fn(mb)
            if not torch.isfinite(loss):
                if self.processes.world == 1:
                    raise TrainingDiverged(self.bad_loss_message(loss.item(), step))
                bad_loss = loss.item()  # raised in `average` on every process at once, or the others would wait
                continue
            (loss * weight).backward()
            for k, v in {"loss": loss.item(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v * weight
        return sums, bad_loss

    def average(self, sums: dict, bad_loss: float | None, step: int) -> dict:
        """Average the gradients and statistics over the processes; any process's bad loss stops them all."""
        keys = sorted(sums)
        extra = torch.tensor([sums[k] for k in keys] + [float(bad_loss is not None)], dtype=torch.float64)
        reduced = self.processes.average_gradients(self.params, extra).tolist()
        if reduced[-1] > 0:
            raise TrainingDiverged(self.bad_loss_message(bad_loss if bad_loss is not None
                                                         else "not finite on another process", step))
        stats = dict(zip(keys, reduced[:-1]))
        if self.processes.distributed:
            stats["allreduce_bytes"] = self.processes.allreduce_bytes
        if self.base.sharded:  # this process's slices of the base, and the whole base (bytes)
            stats["fsdp_base_bytes_local"], stats["fsdp_base_bytes_full"] = self.base.shard_bytes
        return stats

    def clip(self) -> torch.Tensor:
        """Clip the gradients to max_grad_norm; returns their norm before clipping."""
        if self.base.sharded:
            return clip_grad_norm(self.params, self.max_grad_norm, self.processes._comm_device())
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def bad_loss_message(self, loss, step: int) -> str:
        return f"step {step}: the loss is {loss}; stopped before updating. {last_good(self.out)}"

    @torch.no_grad()
    def check_finite(self, lr: float, step: int) -> None:
        """Stop the run if the update left a trained tensor or the optimizer state non-finite.

        Checked after every update, so a bad step stops the run before it can reach a checkpoint
        (docs/design.md, "The run skeleton"). One fused max-norm per group of tensors keeps it cheap;
        a NaN or infinity anywhere makes it non-finite.
        """
        moments = [t for st in self.optimizer.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0]
        for kind, tensors in (("optimizer state", moments), ("trained tensors", self.params)):
            if not tensors:
                continue
            norms = torch._foreach_norm([local(t) for t in tensors], float("inf"))  # max |x|: finite for any finite
            finite = bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())  # tensor, unlike L2
            if self.base.sharded:  # each process checked its slices: all stop, or none
                finite = self.processes.all_agree(finite)
            if not finite:
                from align.train.state import inconsistent_moments

                corrupt = inconsistent_moments(self.optimizer.state, self.optimizer.param_groups)
                cause = ("a corrupted optimizer state (e.g. from a damaged checkpoint)"
                         if kind == "optimizer state" or corrupt
                         else f"the learning rate ({lr:g}) is too high for this model")
                raise TrainingDiverged(f"step {step}: the {kind} turned NaN or infinite after the update; "
                                       f"likely cause: {cause}. Stopped before saving anything. {last_good(self.out)}")
