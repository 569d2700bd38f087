"""The part of the lifecycle that recipes trained on preference pairs share (DPO, ORPO, CPO, reward models).

Rows are read and validated by align.data.preference (errors name file:line), tokenised once, and
split into training and held-out pairs. Step `s` trains on `step_batches(..., s)`: a pure
function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.

On N processes a step's global batch is per_device_train_batch_size x gradient_accumulation_steps
x N pairs (TRL's convention), cut into micro-batches exactly as one process with N times the
accumulation would cut it; process r takes micro-batches r, r+N, ... (docs/scaling.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.core.errors import UserError
from align.data.issues import bad_rows
from align.data.preference import (
    PreferenceSet,
    TokenizedPair,
    load_preferences,
    split_held_out,
    tokenize_preferences,
)
from align.train.lifecycle import StepBatches, Trainer


class PreferenceTrainer(Trainer):
    """A Trainer whose data are preference pairs; subclasses give `pair_loss` and `evaluate`.

    A step's micro-batches are lists of indices into self.pairs; `loss` is `pair_loss` of one.
    """

    fsdp_ready = True

    def __init__(self, config, resume: bool | str | None = None, overwrite: bool = False, base=None,
                 train_dataset=None, eval_dataset=None, resume_changed: bool = False):
        """`train_dataset` / `eval_dataset` (TRL's names): a datasets.Dataset or a list of row dicts, in
        place of train_file / eval_file, for the Python API."""
        super().__init__(config, resume, overwrite, base, resume_changed)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.preference_data: tuple[PreferenceSet, PreferenceSet | None] | None = None

    def data_sources(self) -> tuple:
        """(training source, held-out source or None): the objects given, else the config's files or name."""
        c = self.config
        train = self.train_dataset if self.train_dataset is not None else c.train_source()
        held_out = self.eval_dataset if self.eval_dataset is not None else c.eval_file
        return train, held_out

    def require_train_source(self) -> None:
        """Checked in the trainer, not the config: the Python API may pass train_dataset instead. Still before any
        model loads."""
        if self.train_dataset is None and not self.config.train_source():
            raise UserError("train_file: expected a preference data file, a folder (save_to_disk or of data files) or a "
                            "dataset name (or dataset_name; or train_dataset= in Python)")

    def pair_loss(self, pairs: list[TokenizedPair], indices: list[int] | None, train: bool):
        """(loss, stats) of one micro-batch of pairs; `indices` are their positions in self.pairs."""
        raise NotImplementedError

    # -- data ----------------------------------------------------------------------------------
    def has_sources(self) -> bool:
        """Whether the data exist before the base loads (a reward model's demo pairs are sampled from it)."""
        return True

    def read_data(self) -> None:
        self.preference_data = self.read_sets(*self.data_sources()) if self.has_sources() else None

    def read(self, source, split: str = "train", label: str | None = None) -> PreferenceSet:
        """One preference source's validated rows; the rows `on_bad_rows: skip` dropped are shown and bounded."""
        c = self.config
        data = load_preferences(source, c.format, c.on_bad_rows, split, c.dataset_config, label, c.max_bad_fraction)
        self.report_skipped(data.source, data.skipped, len(data.rows) + bad_rows(data.skipped), c.max_bad_fraction)
        return data

    def read_sets(self, train_file, eval_file) -> tuple[PreferenceSet, PreferenceSet | None]:
        """(training rows, held-out rows or None). A dataset name or a saved DatasetDict gives `dataset_split` for
        training and "test" (TRL's dataset_test_split default) for evaluation."""
        named = isinstance(train_file, str)
        train = self.read(train_file, self.config.dataset_split, None if named else "train_dataset")
        if eval_file is None or (isinstance(eval_file, str) and not eval_file):
            return train, None
        return train, self.read(eval_file, "test", None if isinstance(eval_file, str) else "eval_dataset")

    def tokenize(self, data: PreferenceSet) -> list[TokenizedPair]:
        c = self.config
        return tokenize_preferences(data.rows, self.base.tokenizer, c.max_length, c.chat_template, c.on_bad_rows)

    def load_pairs(self, train_file, eval_file) -> None:
        """Set self.pairs, self.eval_pairs and self.skipped_rows from the rows read_data read (or from these
        sources, when they were made after the base loaded)."""
        c = self.config
        train, held_out = self.preference_data or self.read_sets(train_file, eval_file)
        pairs, self.skipped_rows = self.tokenize(train), len(train.skipped)
        if held_out is not None:
            self.eval_pairs = self.tokenize(held_out)
        else:
            pairs, self.eval_pairs = split_held_out(pairs, c.eval_fraction, c.seed)
        if not pairs:
            raise UserError(f"{train.source}: no training pairs left")
        self.pairs = pairs

    def num_steps(self) -> int:
        return self.data_parallel_steps(len(self.pairs), "pairs")

    def eval_chunks(self):
        size = self.config.per_device_eval_batch_size
        for start in range(0, len(self.eval_pairs), size):
            yield self.eval_pairs[start:start + size]

    def evaluate(self) -> dict:
        """Held-out means of the loss and of every statistic pair_loss gives (e.g. preference accuracy, margins)."""
        if not self.eval_pairs:
            return {}
        self.base.model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for chunk in self.eval_chunks():
                loss, stats = self.pair_loss(chunk, None, train=False)
                for k, v in {"loss": loss.item(), **stats}.items():
                    sums[k] = sums.get(k, 0.0) + v * len(chunk)
        return {f"eval/{k}": v / len(self.eval_pairs) for k, v in sums.items()}

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['rewards/accuracies']:.2f}"}

    def save_final(self, final: dict) -> Path:
        """The trained adapter (DPO, ORPO, CPO); a reward model saves its head beside it instead."""
        return self.base.save_adapter(self.config.adapter_name, self.out / "adapter")

    # -- one step ------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> StepBatches:
        """This process's share of step `step`'s micro-batches (pair indices), and the global batch's counts."""
        every = self.global_batches_for_step(len(self.pairs), step)
        chosen = [self.pairs[i] for idx in every for i in idx]
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in chosen)
        return StepBatches(self.processes.shard(every), len(every), {"pairs": len(chosen), "tokens": tokens})

    def loss(self, micro_batch: list[int]):
        return self.pair_loss([self.pairs[i] for i in micro_batch], micro_batch, True)

    def summary_extra(self) -> dict:
        return {"skipped_rows": self.skipped_rows, "train_pairs": len(self.pairs)}
