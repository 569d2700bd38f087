"""One lifecycle under every recipe: setup -> train (step, log, evaluate, checkpoint) -> save -> close.

A recipe (DPO, reward model, PPO, ...) is a subclass that fills in a few hooks:

    read_data()           read and validate the rows before any model loads (a data error comes first)
    build()               adapters, heads and data on the loaded base; returns the optimizer's param groups
    num_steps()           how many steps the run has
    optimizer_steps()     how many optimizer steps those take (the learning-rate schedule's length)
    micro_batches(step)   this process's micro-batches of step `step` (a StepBatches)
    loss(micro_batch)     (loss, statistics) of one micro-batch
    evaluate()            held-out metrics, {} if there is nothing to evaluate
    save_final(final)     write what the run delivers; returns its path

and, where the defaults do not fit: trained_adapters, heads, state_extra / load_extra (checkpointed
recipe state), start, before_train, after_step, progress, summary_extra, final_path, close.

A step is the lifecycle's: `training_step` sends each micro-batch through `loss` and takes one
optimizer step over them (align.train.gradient_step: accumulate, clip, update, check, schedule).
A recipe that takes several optimizer steps per training step (PPO) overrides `training_step`
instead and calls `self.gradient_step` itself for each of its updates.

Everything else is here, once: the output-folder policy, seeding, the base, AdamW, the
transformers learning-rate schedule, the train state (checkpoint and exact resume),
metrics without duplicate steps after a resume, and the progress bar. The config stays as the
user gave it; the device and dtype it resolves to are `self.device` and `self.dtype`.

On N processes (`accelerate launch`, docs/scaling.md) the same hooks run on every process:
`self.processes` says which one this is; the gradient step averages the trained tensors'
gradients over the processes; only the main process evaluates and writes (config, metrics,
checkpoints, final files). A recipe shards its data with `self.processes.shard`. Under FSDP
(align/core/fsdp.py) the base is sharded after `build`, and every process evaluates and gathers what is saved.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.core.distributed import Processes
from align.core.errors import UserError
from align.core.fsdp import gathered_adapters, refuse_unsupported, shard_base
from align.data.preference import global_step_batches
from align.train.gradient_step import GradientStep
from align.train.optim import adamw
from align.train.placement import apply_cpu_settings, check_precision, resolve_placement
from align.train.resume_check import check_resume, config_record, record_history
from align.train.run_folder import check_model_available, last_good, prepare_output_dir
from align.train.state import TrainState, optimizer_tensors, read_state, sweep_run_temps
from align.train.trainable import announce_trainable


@dataclass(frozen=True)
class StepBatches:
    """What one training step trains on: this process's micro-batches (each given to `loss`), how many
    micro-batches every process's share of the step holds together, and counts of the whole step's
    data (`pairs`, `tokens`: logged as rates)."""

    local: list
    global_count: int
    counts: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rank_step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of process `rank` at global step `step` of a multi-process run (docs/scaling.md, "Resume")."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 31)


class Trainer:
    """The shared lifecycle; see the module docstring for the hooks a recipe fills in."""

    name = "train"
    fsdp_ready = False  # whether the recipe runs on a base sharded by FSDP (align/core/fsdp.py)

    def __init__(self, config, resume: bool | str | None = None, overwrite: bool = False, base=None,
                 resume_changed: bool = False):
        """`base`: train on a SharedBase already in memory (e.g. the demo's) instead of loading one.
        `resume_changed`: resume even where training settings differ from the checkpoint's (recorded)."""
        self.config = config
        self.out = Path(config.output_dir)
        self.resume = resume
        self.resume_changed = resume_changed
        self.history = self.recorded = None  # what a resume changed; whether its checkpoint recorded a config
        self.overwrite = overwrite
        self.base = base
        self.device = self.dtype = None  # resolved in setup; the config keeps what the user wrote
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

    def micro_batches(self, step: int) -> StepBatches:
        raise NotImplementedError

    def loss(self, micro_batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, stats: dict) -> dict:
        """Metrics a recipe adds once the step's update is done (e.g. SFT's running token count)."""
        return {}

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

    def read_data(self) -> None:
        """Read and validate the data before the base loads, so that a data error never waits for a model."""

    def report_skipped(self, name: str, issues: list, total: int, max_bad_fraction: float) -> None:
        """Stop when more than max_bad_fraction of `total` rows are bad; else say what on_bad_rows: skip dropped."""
        from align.data.issues import check_bad_fraction, skipped_report

        check_bad_fraction(name, issues, total, max_bad_fraction)
        if issues and self.processes.is_main:
            print(f"[align] {skipped_report(name, issues, total)}")

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Resolve where the run lives and claim its folder, then build in order: the base, the recipe's
        tensors on it (build), the optimizer over exactly those, the restored state, metrics, engines (start)."""
        from align.core.loading import resolve_model

        c = self.config
        self.processes = Processes(c.device)
        if self.processes.fsdp:
            refuse_unsupported(c, self.name, self.fsdp_ready)
        self.device, self.dtype = resolve_placement(c, self.processes.device, self.base)
        main = self.processes.is_main
        self.read_data()
        self.model_path = resolve_model(c.model_name_or_path)  # a wrong path fails before anything is touched
        check_model_available(c.model_name_or_path, self.model_path)
        checkpoint = self.claim_output_dir()
        if checkpoint is not None:
            self.compare_settings(checkpoint)  # before anything is loaded: may set gradient_accumulation_steps
        apply_cpu_settings(c, self.device, main)
        check_precision(self.device, self.dtype, c.dtype, main)
        seed_everything(c.seed)
        groups = self.build_on_base()
        self.optimizer = adamw(groups, weight_decay=c.weight_decay)
        self.total_steps = self.num_steps()
        self.scheduler = self.learning_rate_schedule(self.optimizer_steps())
        self.gradient_step = GradientStep(self.optimizer, self.scheduler, self.processes, self.base,
                                          c.max_grad_norm, self.out)
        self.state = TrainState(self.base, self.trained_adapters(), self.optimizer, self.scheduler, self.heads(),
                                record={"config": config_record(c), "world": self.processes.world})
        if checkpoint is not None:
            self.step, extra = self.state.load(checkpoint)
            self.load_extra(extra)
            if main:
                print(f"[align] resumed from {checkpoint} at step {self.step}")
        self.logger = self.open_metrics()
        # A killed attempt may have logged past its last checkpoint; with none, everything it logged is redone.
        self.logger.truncate_after(self.step if checkpoint is not None else -1)
        self.start()
        self._setup_done = True

    def claim_output_dir(self) -> Path | None:
        """Apply the output-folder policy on every process; returns the checkpoint to resume from, if any."""
        main = self.processes.is_main
        if main:
            # Swept first: a checkpoint moved aside by a killed replace is put back before resume looks.
            for name in sweep_run_temps(self.out):
                print(f"[align] removed {name}, left by an earlier run killed while writing it")
        self.processes.barrier()
        checkpoint = prepare_output_dir(self.out, self.resume, self.overwrite, main)
        self.processes.barrier()  # the main process's --overwrite deletion is done before anyone goes on
        return checkpoint

    def compare_settings(self, checkpoint: Path) -> None:
        """Refuse (or, with resume_changed, record) training settings that differ from the checkpoint's."""
        state = read_state(checkpoint)
        self.recorded = isinstance(state.get("config"), dict)
        say = print if self.processes.is_main else (lambda _: None)
        self.history = check_resume(self.config, state, self.processes.world, self.resume_changed, checkpoint.name,
                                    say)

    def build_on_base(self) -> list[dict]:
        """Load the base (unless one was handed in), let the recipe build on it; returns the param groups."""
        from align.core.base import SharedBase

        c = self.config
        if self.base is None:
            # FSDP: loaded whole on the CPU, then each process moves only its slices to its device.
            self.base = SharedBase.load(self.model_path, self.dtype, "cpu" if self.processes.fsdp else self.device,
                                        c.trust_remote_code, c.gradient_checkpointing, c.checkpoint_keep_last,
                                        load_in_4bit=getattr(c, "four_bit", None))
        groups = self.build()
        self.param_counts = announce_trainable(self.base, groups, self.trained_adapters(), self.processes.is_main)
        if self.processes.fsdp:
            groups = shard_base(self.base, self.processes, groups, self.heads())
        # Same seed, same adapters everywhere already; the broadcast makes it so whatever the device's kernels do.
        self.processes.broadcast_parameters([p for g in groups for p in g["params"]])
        return groups

    def learning_rate_schedule(self, total_updates: int):
        # Imported here, not above: transformers' scheduler module imports peft (seconds), which a bad
        # model path or folder should not wait for.
        from transformers import get_scheduler

        c = self.config
        return get_scheduler(c.lr_scheduler_type, self.optimizer, num_warmup_steps=c.warmup_for(total_updates),
                             num_training_steps=total_updates)

    def open_metrics(self):
        """The main process writes config.yaml (as the run started: a resume that compared settings keeps it,
        recording what it changed in config_history.yaml) and metrics; the others log nothing."""
        from dataclasses import asdict

        from align.train.config_parser import dump_config
        from align.train.metrics import MetricsLogger, NullLogger

        if not self.processes.is_main:
            return NullLogger()
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.recorded and (self.out / "config.yaml").is_file()):
            dump_config(self.config, self.out / "config.yaml")
        if self.history:
            record_history(self.out, self.history)
        return MetricsLogger(self.out, self.config.report_to, config=asdict(self.config))

    # -- one training step -------------------------------------------------------------------------
    def training_step(self) -> dict:
        """Step `self.step` (0-based) for a recipe with one optimizer step per training step: its
        micro-batches, each through its loss, accumulated into one clipped update (GradientStep)."""
        self.base.model.train()  # gradient checkpointing (and adapter dropout) act only in train mode
        batches = self.micro_batches(self.step)
        stats = self.gradient_step(batches.local, self.loss, self.step + 1, batches.global_count)
        stats.update(batches.counts)
        return {**stats, **self.after_step(stats)}

    def last_good(self) -> str:
        """What a diverged run can continue from, claiming intact only what was verified just now."""
        return last_good(self.out)

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
                self.summary = {"step": self.step, **self.param_counts, **self.summary_extra(), **final}
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
