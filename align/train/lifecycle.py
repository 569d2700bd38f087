"""One lifecycle under every recipe: setup -> train (step, log, evaluate, checkpoint) -> save -> close.

A recipe (DPO, reward model, PPO, ...) is a subclass that fills in a few hooks:

    build()            adapters, heads and data on the loaded base; returns the optimizer's param groups
    num_steps()        how many steps the run has
    optimizer_steps()  how many optimizer steps those take (the learning-rate schedule's length)
    training_step()    one step; returns its metrics (usually through `optimizer_step`)
    evaluate()         held-out metrics, {} if there is nothing to evaluate
    save_final(final)  write what the run delivers; returns its path

Everything else is here, once: the output-folder policy, seeding, the base, AdamW, the
transformers learning-rate schedule, the train state (checkpoint and exact resume),
metrics without duplicate steps after a resume, and the progress bar.

On N processes (`accelerate launch`, docs/scaling.md) the same hooks run on every process:
`self.processes` says which one this is; `optimizer_step` averages the trained tensors'
gradients over the processes; only the main process evaluates and writes (config, metrics,
checkpoints, final files). A recipe shards its data with `self.processes.shard`. Under FSDP
(align/fsdp.py) the base is sharded after `build`, and every process evaluates and gathers what is saved.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from align.core.distributed import Processes
from align.core.errors import TrainingDiverged, UserError
from align.core.fsdp import clip_grad_norm, gathered_adapters, local, refuse_unsupported, shard_base
from align.data.preference import global_step_batches
from align.train.run_folder import check_model_available, prepare_output_dir
from align.train.state import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    optimizer_tensors,
    sweep_run_temps,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rank_step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of process `rank` at global step `step` of a multi-process run (docs/scaling.md, "Resume")."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 31)


class NullLogger:
    """What a process other than the main one logs to: nothing (only the main process writes)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """The shared lifecycle; see the module docstring for the hooks a recipe fills in."""

    name = "train"
    fsdp_ready = False  # whether the recipe runs on a base sharded by FSDP (align/fsdp.py)

    def __init__(self, config, resume: bool | str | None = None, overwrite: bool = False, base=None):
        """`base`: train on a SharedBase already in memory (e.g. the demo's) instead of loading one."""
        self.config = config
        self.out = Path(config.output_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.base = base
        self.step = 0
        self.train_seconds = 0.0  # this process's time in training steps (for throughput summaries)
        self.pairs_seen = 0
        self._setup_done = False

    # -- hooks ---------------------------------------------------------------------------------
    def build(self) -> list[dict]:
        raise NotImplementedError

    def num_steps(self) -> int:
        raise NotImplementedError

    def optimizer_steps(self) -> int:
        return self.num_steps()

    def training_step(self) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def save_final(self, final: dict) -> Path:
        raise NotImplementedError

    def trained_adapters(self) -> list[str]:
        return [self.config.adapter_name]

    def heads(self) -> dict[str, torch.nn.Module]:
        return {}

    def state_extra(self) -> dict:
        """Recipe state beyond tensors (e.g. PPO's adaptive KL coefficient), saved in each checkpoint."""
        return {}

    def load_extra(self, extra: dict) -> None:
        pass

    def start(self) -> None:
        """Called once everything is restored, before the first step (e.g. to start an engine)."""

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}"} if "loss" in stats else {}

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from dataclasses import asdict

        from align.core.base import SharedBase
        from align.core.hardware import default_dtype
        from align.core.heap import limit_heap_fragmentation
        from align.core.loading import resolve_model
        from align.train.config_parser import dump_config
        from align.train.metrics import MetricsLogger
        from align.train.optim import adamw

        c = self.config
        self.requested_device = c.device
        self.processes = Processes(c.device)
        if self.processes.fsdp:
            refuse_unsupported(c, self.name, self.fsdp_ready)
        c.device = self.processes.device  # recipes read config.device: from here on it is this process's device
        if self.base is not None:  # a base already in memory stays where it is
            c.device = str(next(self.base.model.parameters()).device)
        self.requested_dtype = c.dtype
        if c.dtype == "auto":  # from here on recipes read the dtype the base is in
            c.dtype = self.base.load_dtype if self.base is not None else default_dtype(c.device)
        main = self.processes.is_main
        self.model_path = resolve_model(c.model_name_or_path)  # a wrong path fails before anything is touched
        check_model_available(c.model_name_or_path, self.model_path)
        if main:
            # Swept first: a checkpoint moved aside by a killed replace is put back before resume looks.
            for name in sweep_run_temps(self.out):
                print(f"[align] removed {name}, left by an earlier run killed while writing it")
        self.processes.barrier()
        checkpoint = prepare_output_dir(self.out, self.resume, self.overwrite, main)
        self.processes.barrier()  # the main process's --overwrite deletion is done before anyone goes on
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        if c.heap_mmap_threshold_mb is not None:
            self.cpu_only("heap_mmap_threshold_mb", lambda: limit_heap_fragmentation(c.heap_mmap_threshold_mb))
        self.check_precision()
        seed_everything(c.seed)
        if self.base is None:
            # Build order matters: the base, then adapters and heads on it (build), then the optimizer
            # over exactly the trained tensors, then the restored state, then engines (start).
            # FSDP: loaded whole on the CPU, then each process moves only its slices to its device.
            self.base = SharedBase.load(self.model_path, c.dtype, "cpu" if self.processes.fsdp else c.device,
                                        c.trust_remote_code,
                                        c.gradient_checkpointing, c.checkpoint_keep_last,
                                        load_in_4bit=getattr(c, "four_bit", None))
        groups = self.build()
        if self.processes.fsdp:
            groups = shard_base(self.base, self.processes, groups, self.heads())
        # Same seed, same adapters everywhere already; the broadcast makes it so whatever the device's kernels do.
        self.processes.broadcast_parameters([p for g in groups for p in g["params"]])
        self.optimizer = adamw(groups, weight_decay=c.weight_decay)
        self.total_steps = self.num_steps()
        total_updates = self.optimizer_steps()
        # Imported here, not above: transformers' scheduler module imports peft (seconds), which a bad
        # model path or folder should not wait for.
        from transformers import get_scheduler

        self.scheduler = get_scheduler(c.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=c.warmup_for(total_updates),
                                       num_training_steps=total_updates)
        self.state = TrainState(self.base, self.trained_adapters(), self.optimizer, self.scheduler, self.heads())
        if checkpoint is not None:
            self.step, extra = self.state.load(checkpoint)
            self.load_extra(extra)
            if main:
                print(f"[align] resumed from {checkpoint} at step {self.step}")
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(self.config_as_given(), self.out / "config.yaml")
            self.logger = MetricsLogger(self.out, c.report_to, config=asdict(self.config_as_given()))
        else:
            self.logger = NullLogger()
        # A killed attempt may have logged past its last checkpoint; with none, everything it logged is redone.
        self.logger.truncate_after(self.step if checkpoint is not None else -1)
        self.start()
        self._setup_done = True

    # -- one optimizer step ----------------------------------------------------------------------
    def optimizer_step(self, micro_batches: list, loss_fn, global_micro_batches: int | None = None) -> dict:
        """Accumulate gradients over `micro_batches` (loss_fn(mb) -> (loss, stats)), clip, update, schedule.

        Returns the micro-batch mean of the loss and of each statistic, plus grad_norm and the
        learning rate the update used. A non-finite loss or gradient stops the run before the update.
        On N processes `micro_batches` is this process's share of the step's `global_micro_batches`
        (default: N x as many); every micro-batch weighs 1/global in the loss, as on one process, and
        the trained tensors' gradients (and the statistics) are averaged over the processes.
        """
        c = self.config
        world = self.processes.world
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        weight = world / (global_micro_batches or len(micro_batches) * world)
        bad_loss = None
        for mb in micro_batches:
            loss, stats = loss_fn(mb)
            if not torch.isfinite(loss):
                if world == 1:
                    raise TrainingDiverged(self.bad_loss_message(loss.item()))
                bad_loss = loss.item()  # raised below on every process at once, or the others would wait forever
                continue
            (loss * weight).backward()
            for k, v in {"loss": loss.item(), **stats}.items():
                agg[k] = agg.get(k, 0.0) + v * weight
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        keys = sorted(agg)
        extra = torch.tensor([agg[k] for k in keys] + [float(bad_loss is not None)], dtype=torch.float64)
        reduced = self.processes.average_gradients(params, extra).tolist()
        if reduced[-1] > 0:
            raise TrainingDiverged(self.bad_loss_message(bad_loss if bad_loss is not None else "not finite "
                                                         "on another process"))
        agg = dict(zip(keys, reduced[:-1]))
        if self.processes.distributed:
            agg["allreduce_bytes"] = self.processes.allreduce_bytes
        if self.base.sharded:  # this process's slices of the base, and the whole base (bytes)
            agg["fsdp_base_bytes_local"], agg["fsdp_base_bytes_full"] = self.base.shard_bytes
            grad_norm = clip_grad_norm(params, c.max_grad_norm, self.processes._comm_device())
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"step {self.step + 1}: the gradient norm is {grad_norm.item()}; stopped "
                                   f"before updating. {self.last_good()}")
        self.optimizer.step()
        self.check_finite(lr)
        self.scheduler.step()
        return {**agg, "grad_norm": grad_norm.item(), "learning_rate": lr}

    def bad_loss_message(self, loss) -> str:
        return f"step {self.step + 1}: the loss is {loss}; stopped before updating. {self.last_good()}"

    @torch.no_grad()
    def check_finite(self, lr: float) -> None:
        """Stop the run if the update left a trained tensor or the optimizer state non-finite.

        Checked after every update, so a bad step stops the run before it can reach a checkpoint
        (docs/design.md, "The run skeleton"). One fused max-norm per group of tensors keeps it cheap;
        a NaN or infinity anywhere makes it non-finite.
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        moments = [t for st in self.optimizer.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0]
        for kind, tensors in (("optimizer state", moments), ("trained tensors", params)):
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
                raise TrainingDiverged(f"step {self.step + 1}: the {kind} turned NaN or infinite after the update; "
                                       f"likely cause: {cause}. Stopped before saving anything. {self.last_good()}")

    def last_good(self) -> str:
        """What a diverged run can continue from, claiming intact only what was verified just now."""
        try:
            path = latest_checkpoint(self.out, say=lambda _: None)
        except CheckpointError as e:
            return f"No checkpoint is intact: {e}"
        return (f"The newest checkpoint, {path}, verified intact (continue with --resume, perhaps with a lower "
                f"learning_rate)." if path else "No checkpoint was written yet.")

    # -- the run ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Written by the main process only (the others hold the same adapters); returns its path.

        FSDP: every process first gathers the full adapters and optimizer state with the others.
        """
        if self.base.sharded:
            with gathered_adapters(self.base, self.trained_adapters()):
                optim = optimizer_tensors(self.optimizer)  # all-gathers the sharded moments
                if self.processes.is_main:
                    return self.state.save(self.out, self.step, self.state_extra(), self.config.save_total_limit,
                                           optim)
        if not self.processes.is_main:
            return self.out / "checkpoints" / f"step-{self.step:06d}"
        return self.state.save(self.out, self.step, self.state_extra(), keep=self.config.save_total_limit)

    def before_train(self) -> None:
        """Work done once before the first step (e.g. reference log-probs, the 'before' evaluation)."""

    def train(self) -> Path:
        if not self._setup_done:
            self.setup()
        try:
            return self._train()
        finally:
            if getattr(self, "_bar", None) is not None:
                self._bar.close()  # ends the bar's line, so an error after it starts a line of its own
            self.logger.close()  # metrics are flushed whatever happens; engines stay up until close()

    def _train(self) -> Path:
        from tqdm import tqdm

        c = self.config
        self.before_train()
        main = self.processes.is_main
        bar = self._bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step",
                               dynamic_ncols=True, disable=not main)
        final = None
        while self.step < self.total_steps:
            if self.processes.distributed:
                # Each process its own stream, a pure function of (seed, step, rank): resume needs no saved RNG.
                seed_everything(rank_step_seed(c.seed, self.step, self.processes.rank))
            t0 = time.perf_counter()
            stats = self.processes.mean(self.training_step())
            self.step += 1
            stats["step_s"] = time.perf_counter() - t0
            stats["epoch"] = self.epoch()
            self.train_seconds += stats["step_s"]
            self.pairs_seen += stats.get("pairs", 0)
            for key in ("tokens", "pairs"):  # counts of this step -> rates
                if key in stats:
                    stats[f"{key}_per_s"] = stats.pop(key) / stats["step_s"]
            last = self.step == self.total_steps
            if (main or self.base.sharded) and (last or (c.eval_steps and self.step % c.eval_steps == 0)):
                # The adapters are the same everywhere: one process evaluates (all under FSDP: the forwards
                # gather the base's slices from every process).
                evaluation = self.evaluate()
                stats.update(evaluation)
                if last:
                    final = evaluation
            if self.step % c.logging_steps == 0 or last:
                self.logger.log(self.step, stats)
            bar.update(1)
            bar.set_postfix(**self.progress(stats))
            if c.save_steps and self.step % c.save_steps == 0 and not last:
                self.save_checkpoint()
        bar.close()
        if final is None:  # nothing was left to train (a finished run, resumed): its last step logged this
            final = self.evaluate() if main or self.base.sharded else {}
        self.save_checkpoint()
        self.summary = {"step": self.step}  # a recipe's summary may read what only the main process evaluated
        with gathered_adapters(self.base, self.trained_adapters()):  # FSDP: every process gathers, main writes
            if main:
                self.summary = {"step": self.step, **self.summary_extra(), **final}
                path = self.save_final(final)
                from align.core.atomic import atomic_write_text

                atomic_write_text(self.out / "final_metrics.json", json.dumps(self.summary, indent=2, default=str))
        self.processes.barrier()  # every process returns once the run's files are complete
        if not main:
            path = self.final_path()
        return path

    def final_path(self) -> Path:
        """Where `save_final` puts what the run delivers (what processes other than the main one return)."""
        return self.out

    # -- where the run is ----------------------------------------------------------------------------
    def config_as_given(self):
        """The config as the user wrote it (device and dtype auto, not what they resolved to here), for config.yaml."""
        import copy

        given = copy.copy(self.config)
        given.device, given.dtype = self.requested_device, self.requested_dtype
        return given

    def cpu_only(self, field: str, apply) -> None:
        """Apply a CPU-process setting (glibc heap, CPU threads) only where the base lives on the CPU."""
        if self.config.device == "cpu":
            apply()
        elif self.processes.is_main:
            print(f"[align] {field} applies to CPU runs; ignored on {self.config.device}")

    def check_precision(self) -> None:
        """Warn about bfloat16 where it is emulated; point out bfloat16 where auto chose float32 but it is native."""
        import warnings

        from align.core.hardware import fast_bfloat16

        c = self.config
        native = fast_bfloat16(c.device)  # reads /proc/cpuinfo on a CPU: once
        if c.dtype == "bfloat16" and not native:
            warnings.warn(f"dtype bfloat16 on {c.device}: this machine emulates bfloat16 matrix "
                          "work (several times slower than float32); use float32 here", stacklevel=2)
        elif native and self.requested_dtype == "auto" and c.dtype == "float32" and self.processes.is_main:
            print(f"[align] dtype auto: float32 on {c.device}, which computes bfloat16 natively: "
                  "--bf16 true halves the base and ran DPO ~2x faster (docs/scaling.md, \"Precision\")")

    def data_parallel_steps(self, n_items: int, noun: str) -> int:
        """Total optimizer steps over `n_items` at a global batch of per-device x accumulation x processes."""
        c = self.config
        world = self.processes.world
        per_step = c.per_device_train_batch_size * c.gradient_accumulation_steps * world
        self.steps_per_epoch, total = epochs_to_steps(n_items, per_step, c.num_train_epochs, c.max_steps)
        short = n_items % per_step  # the last step of an epoch
        if short and short < world:
            raise UserError(f"{n_items} training {noun} leave a last step of {short} for {world} processes; "
                            f"drop or add {noun}, or change the batch size")
        return total

    def global_batches_for_step(self, n_items: int, step: int) -> list[list[int]]:
        """Item indices of each micro-batch of global step `step` (0-based), every process's."""
        c = self.config
        return global_step_batches(n_items, c.per_device_train_batch_size, c.gradient_accumulation_steps,
                                   self.processes.world, c.seed, step)

    def epoch(self) -> float:
        return self.step / max(1, self.steps_per_epoch) if getattr(self, "steps_per_epoch", 0) else 0.0

    def summary_extra(self) -> dict:
        return {}

    def close(self) -> None:
        """Release what the run holds (metrics writers; a recipe adds its engines)."""
        if getattr(self, "logger", None) is not None:
            self.logger.close()


def epochs_to_steps(n_items: int, items_per_step: int, num_train_epochs: int, max_steps: int) -> tuple[int, int]:
    """(steps per epoch, total steps) for a dataset of `n_items`; max_steps > 0 caps (or extends) the run."""
    per_epoch = max(1, math.ceil(n_items / items_per_step))
    return per_epoch, (max_steps if max_steps > 0 else per_epoch * num_train_epochs)
