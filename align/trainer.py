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
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from align.errors import TrainingDiverged, UserError
from align.train_state import CHECKPOINTS, TrainState, find_checkpoint, latest_checkpoint

# Files whose presence means a folder already holds a run.
RUN_MARKERS = ("config.yaml", CHECKPOINTS, "metrics.jsonl")


def prepare_output_dir(out: Path, resume: bool | str | None = None, overwrite: bool = False) -> Path | None:
    """Apply the output-folder policy; returns the checkpoint to resume from, if any.

    A folder that already holds a run is refused unless `resume` (continue it: the latest
    checkpoint, or the one named) or `overwrite` (delete it and start over) is given.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} is a file; expected a folder (new or holding a run)")
    held = [m for m in RUN_MARKERS if (out / m).exists()]
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite: choose one")
        checkpoint = find_checkpoint(out, None if resume is True else str(resume))
        if checkpoint is None:
            print(f"[align] no checkpoint in {out}; starting fresh")
        return checkpoint
    if held:
        if not overwrite:
            raise UserError(f"output_dir: {out} already holds a run ({', '.join(held)}); pass --resume to "
                            f"continue it or --overwrite to delete it and start over")
        if out.resolve() in (Path.cwd().resolve(), Path.home().resolve(), Path("/")):
            raise UserError(f"--overwrite: refusing to delete {out.resolve()}; choose a run folder of its own")
        shutil.rmtree(out)
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """The shared lifecycle; see the module docstring for the hooks a recipe fills in."""

    name = "train"

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

        from transformers import get_scheduler

        from align.config import dump_config
        from align.heap import limit_heap_fragmentation
        from align.metrics import MetricsLogger
        from align.model import SharedBase, resolve_model
        from align.optim import adamw

        c = self.config
        checkpoint = prepare_output_dir(self.out, self.resume, self.overwrite)
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        if c.heap_mmap_threshold_mb is not None:
            limit_heap_fragmentation(c.heap_mmap_threshold_mb)
        seed_everything(c.seed)
        self.model_path = resolve_model(c.model_name_or_path)
        if self.base is None:
            # Build order matters: the base, then adapters and heads on it (build), then the optimizer
            # over exactly the trained tensors, then the restored state, then engines (start).
            self.base = SharedBase.load(self.model_path, c.dtype, c.device, c.trust_remote_code,
                                        c.gradient_checkpointing, c.checkpoint_keep_last)
        groups = self.build()
        self.optimizer = adamw(groups, weight_decay=c.weight_decay)
        self.total_steps = self.num_steps()
        total_updates = self.optimizer_steps()
        self.scheduler = get_scheduler(c.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=c.warmup_for(total_updates),
                                       num_training_steps=total_updates)
        self.state = TrainState(self.base, self.trained_adapters(), self.optimizer, self.scheduler, self.heads())
        if checkpoint is not None:
            self.step, extra = self.state.load(checkpoint)
            self.load_extra(extra)
            print(f"[align] resumed from {checkpoint} at step {self.step}")
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(c, self.out / "config.yaml")
        self.logger = MetricsLogger(self.out, c.report_to, config=asdict(c))
        self.logger.truncate_after(self.step)  # a killed attempt may have logged past its last checkpoint
        self.start()
        self._setup_done = True

    # -- one optimizer step ----------------------------------------------------------------------
    def optimizer_step(self, micro_batches: list, loss_fn) -> dict:
        """Accumulate gradients over `micro_batches` (loss_fn(mb) -> (loss, stats)), clip, update, schedule.

        Returns the micro-batch mean of the loss and of each statistic, plus grad_norm and the
        learning rate the update used. A non-finite loss or gradient stops the run before the update.
        """
        c = self.config
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        n = len(micro_batches)
        for mb in micro_batches:
            loss, stats = loss_fn(mb)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"step {self.step + 1}: the loss is {loss.item()}; stopped before "
                                       f"updating. {self.last_good()}")
            (loss / n).backward()
            for k, v in {"loss": loss.item(), **stats}.items():
                agg[k] = agg.get(k, 0.0) + v / n
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"step {self.step + 1}: the gradient norm is {grad_norm.item()}; stopped "
                                   f"before updating. {self.last_good()}")
        self.optimizer.step()
        self.scheduler.step()
        return {**agg, "grad_norm": grad_norm.item(), "learning_rate": lr}

    def last_good(self) -> str:
        path = latest_checkpoint(self.out)
        return (f"The last good checkpoint {path} is intact (continue with --resume, perhaps with a lower "
                f"learning_rate)." if path else "No checkpoint was written yet.")

    # -- the run ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        return self.state.save(self.out, self.step, self.state_extra(), keep=self.config.save_total_limit)

    def before_train(self) -> None:
        """Work done once before the first step (e.g. reference log-probs, the 'before' evaluation)."""

    def train(self) -> Path:
        if not self._setup_done:
            self.setup()
        try:
            return self._train()
        finally:
            self.logger.close()  # metrics are flushed whatever happens; engines stay up until close()

    def _train(self) -> Path:
        from tqdm import tqdm

        c = self.config
        self.before_train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True)
        final = None
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            stats = self.training_step()
            self.step += 1
            stats["step_s"] = time.perf_counter() - t0
            stats["epoch"] = self.epoch()
            self.train_seconds += stats["step_s"]
            self.pairs_seen += stats.get("pairs", 0)
            for key in ("tokens", "pairs"):  # counts of this step -> rates
                if key in stats:
                    stats[f"{key}_per_s"] = stats.pop(key) / stats["step_s"]
            last = self.step == self.total_steps
            if last or (c.eval_steps and self.step % c.eval_steps == 0):
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
        if final is None:  # nothing was left to train (a finished run, resumed)
            final = self.evaluate()
            if final:
                self.logger.log(self.step, final)
        self.save_checkpoint()
        path = self.save_final(final)
        from align.atomic import atomic_write_text

        self.summary = {"step": self.step, **self.summary_extra(), **final}
        atomic_write_text(self.out / "final_metrics.json", json.dumps(self.summary, indent=2, default=str))
        return path

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
