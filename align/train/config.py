"""The settings every recipe shares, under TRL's names, so a TRL user's YAML mostly carries over.

    ModelConfig            the base and its adapters (TRL's ModelConfig names: model_name_or_path, lora_r, ...)
    TrainConfig            optimisation, run folder, checkpoints and logging (transformers/TRL names)
    PreferenceDataConfig   preference rows for DPO and reward models

A recipe's config (DPOConfig, RewardConfig, PPOConfig, ...) inherits the sections it uses
and adds its own fields; the YAML stays flat, as TRL's is. Keys that older configs of this
project spelled differently are listed in `RENAMED` and rejected with their new name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass

from align.core.loading import FourBit
from align.core.lora import RECOMMENDED_RANKS, LoraSettings
from align.train.config_parser import arg
from align.train.trackers import check_report_to

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# LoRA loses more than full fine-tuning at large batches (docs/design.md, "LoRA facts behind the defaults").
LARGE_BATCH = 256

# Old spelling -> new, for every recipe (a recipe's RENAMED adds its own).
RENAMED = {
    "model": "model_name_or_path",
    "lora": "the flat keys lora_r, lora_alpha, lora_dropout and lora_target_modules",
    "lr": "learning_rate",
    "lr_schedule": "lr_scheduler_type",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "epochs": "num_train_epochs",
    "steps": "max_steps",
    "log_every": "logging_steps",
    "eval_every": "eval_steps",
    "save_every": "save_steps",
    "keep_checkpoints": "save_total_limit",
    "tensorboard": "report_to (a list: [tensorboard], [wandb], [trackio], [mlflow] or [none])",
}


def _positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name}: expected a positive number, got {value}")


def _at_least_zero(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 0:
            raise ValueError(f"{name}: expected a number >= 0, got {value}")


def _finite(config) -> None:
    """No float field of any recipe may be NaN; learning rates and the optimisation knobs not infinite either."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not isinstance(value, float) or math.isfinite(value):
            continue
        if math.isnan(value) or f.name.endswith("learning_rate") or f.name in FINITE:
            raise ValueError(f"{f.name}: expected a finite number, got {value}")


def _plain_paths(config) -> None:
    """A config built in Python: a Path becomes its text; any other object in a text field is one line, and
    rows where a data path is expected name the argument that takes them (train_file: train_dataset=),
    instead of failing later as yaml's RepresenterError when config.yaml is written."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, os.PathLike):
            setattr(config, f.name, os.fspath(value))
            continue
        tp = hints[f.name]
        arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if str not in arms or isinstance(value, str) or value is None:
            continue
        if isinstance(value, list) and list in (typing.get_origin(a) for a in arms):
            continue  # e.g. lora_target_modules: a list of module names
        module = type(value).__module__.split(".")[0]
        kind = type(value).__name__ if module == "builtins" else f"{module}.{type(value).__name__}"
        instead = getattr(config, "PYTHON_DATA", {}).get(f.name)
        if instead:
            how = f"; pass the rows to the trainer as {instead}= instead"
        elif f.name.endswith("_file") or f.name == "prompts":
            how = "; save the rows to a file (e.g. Dataset.to_json('rows.jsonl')) and give its path"
        else:
            how = ""
        raise ValueError(f"{f.name}: expected text (a path or name), got {kind}{how}")


# Float fields of TrainConfig for which infinity is no setting (a recipe's own fields may use it, e.g. max_kl).
FINITE = ("weight_decay", "max_grad_norm", "warmup_ratio", "lora_dropout")


@dataclass
class ModelConfig:
    model_name_or_path: str = arg("smollm2", "Local model folder, hub id, or 'smollm2' (SmolLM2-135M-Instruct, "
                                             "built offline on first use).")
    dtype: str = arg("auto", "Base weights dtype: auto (bfloat16 on a CUDA GPU that supports it, like TRL's bf16 "
                             "default; else float32, a CPU too: align/core/hardware.py), float32, bfloat16 or "
                             "float16. Adapters train in "
                             "float32.")
    device: str = arg("auto", "Where the base lives: auto (this process's CUDA GPU when there is one, else the "
                              "CPU), cpu, cuda or cuda:N (one process only).")
    trust_remote_code: bool = arg(False, "Run the model repository's own Python code (off: only transformers' "
                                         "built-in architectures load).")
    lora_r: int = arg(8, "LoRA rank (4-8 is enough for RL and preference tuning).")
    lora_alpha: int = arg(32, "LoRA alpha; updates are scaled by alpha/r. Keep it at 32 and tune the learning rate.")
    lora_dropout: float = arg(0.0, "Dropout on the adapter input.")
    lora_target_modules: str | list[str] = arg("all-linear", "'all-linear' (attention, MLP and every MoE expert of "
                                                             "every block), 'attention' (q/k/v/o only), 'mlp' "
                                                             "(gate/up/down and experts only) or a list of module "
                                                             "names (PEFT's target_modules).")
    lora_layers_to_transform: int | list[int] | None = arg(None, "Decoder layer index or list of indices that get "
                                                                 "adapters (PEFT's layers_to_transform); null: all.")
    gradient_checkpointing: bool = arg(False, "Recompute decoder activations in backward: less memory, ~1/3 more "
                                              "compute.")
    checkpoint_keep_last: int = arg(0, "With gradient_checkpointing: the last N decoder layers keep their "
                                       "activations instead of recomputing them (SmolLM2-135M, 4 pairs x 128 "
                                       "tokens: 8 layers cost ~45 MB and made DPO steps ~9% faster).")
    heap_mmap_threshold_mb: float | None = arg(None, "CPU, glibc: allocations of at least this many MB get their "
                                                     "own mapping, returned on free (align/core/heap.py): less peak "
                                                     "memory, slower steps. null: glibc's default.")
    num_threads: int = arg(0, "CPU threads for torch (0: torch's default). On a CPU shared with other jobs, 1 "
                              "avoids oversubscription.")
    load_in_4bit: bool = arg(False, "QLoRA: keep the frozen base's linear weights in 4 bits (bitsandbytes); the "
                                    "reference is the same 4-bit base with adapters off. Needs `align[qlora]`.")
    bnb_4bit_quant_type: str = arg("nf4", "With load_in_4bit: 'nf4' (NormalFloat, QLoRA's) or 'fp4'.")
    bnb_4bit_use_double_quant: bool = arg(True, "With load_in_4bit: quantise the per-block scales too.")
    bnb_4bit_compute_dtype: str = arg("bfloat16", "With load_in_4bit: dtype the 4-bit weights are dequantised to "
                                                  "for each matmul (bfloat16 is emulated and slow on CPUs without "
                                                  "AVX-512 BF16/AMX; float32 there).")

    def __post_init__(self):
        _plain_paths(self)
        _at_least_zero(self, "checkpoint_keep_last", "num_threads")
        _ = self.four_bit  # a bad bnb_4bit_* field fails at load, named
        if self.checkpoint_keep_last and not self.gradient_checkpointing:
            raise ValueError("checkpoint_keep_last: only means something with gradient_checkpointing: true")
        if self.heap_mmap_threshold_mb is not None and self.heap_mmap_threshold_mb <= 0:
            raise ValueError(f"heap_mmap_threshold_mb: expected > 0 or null, got {self.heap_mmap_threshold_mb}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _ = self.lora  # builds LoraSettings now, so a bad lora_* field fails at load, named

    @property
    def four_bit(self) -> FourBit | None:
        """The 4-bit base settings, or None without load_in_4bit."""
        four_bit = FourBit(self.bnb_4bit_quant_type, self.bnb_4bit_use_double_quant, self.bnb_4bit_compute_dtype)
        return four_bit if self.load_in_4bit else None

    @property
    def lora(self) -> LoraSettings:
        targets = self.lora_target_modules
        if targets in (["all"], ["all-linear"]):  # TRL's ModelConfig reads [all-linear] as all-linear
            targets = targets[0]
        targets = "all" if targets in ("all", "all-linear") else targets
        try:
            return LoraSettings(rank=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=targets,
                                layers=self.lora_layers_to_transform)
        except ValueError as e:
            raise ValueError(str(e).replace("lora.rank", "lora_r").replace("lora.alpha", "lora_alpha")
                             .replace("lora.dropout", "lora_dropout").replace("lora.targets", "lora_target_modules")
                             .replace("lora.layers", "lora_layers_to_transform")) from None


@dataclass
class TrainConfig(ModelConfig):
    output_dir: str = arg("runs/run", "Run folder: config.yaml, metrics.jsonl, checkpoints/, the final adapter(s).")
    seed: int = arg(0, "Seed for adapter initialisation, data order and sampling.")
    learning_rate: float = arg(1e-4, "AdamW peak learning rate. LoRA's best is ~10x full fine-tuning's.")
    weight_decay: float = arg(0.0, "AdamW weight decay on adapters and heads.")
    lr_scheduler_type: str = arg("linear", f"transformers.get_scheduler name: one of {', '.join(SCHEDULERS)}.")
    warmup_steps: int = arg(0, "Optimizer steps of linear warm-up from 0 (overrides warmup_ratio when > 0).")
    warmup_ratio: float = arg(0.0, "Warm-up as a fraction of all optimizer steps.")
    max_grad_norm: float = arg(1.0, "Clip the total gradient norm of the trained tensors to this.")
    per_device_train_batch_size: int = arg(8, "Examples per forward pass on each process.")
    per_device_eval_batch_size: int = arg(8, "Examples per forward pass in evaluation.")
    gradient_accumulation_steps: int = arg(1, "Forward passes per optimizer step.")
    num_train_epochs: int = arg(1, "Passes over the training data.")
    max_steps: int = arg(-1, "Stop after this many steps (-1: run num_train_epochs).")
    logging_steps: int = arg(1, "Write metrics every N steps (and at the last); at least 1.")
    eval_steps: int = arg(0, "Evaluate every N steps (0: only at the end).")
    save_steps: int | None = arg(None, "Checkpoint every N steps (0: only at the end; null: every 50, or only at "
                                       "the end with use_peft: false, where a checkpoint holds the whole model).")
    save_total_limit: int = arg(2, "Checkpoints kept; older ones are deleted once a newer one is complete.")
    report_to: list[str] = arg(["tensorboard"], "Where metrics go besides metrics.jsonl: a list of accelerate's "
                                                "trackers (tensorboard, wandb, trackio, mlflow, comet_ml, aim, "
                                                "clearml, dvclive, swanlab) or [none]. All but tensorboard need "
                                                "their extra: pip install 'align-lora[trackio]'.")
    bf16: bool | None = arg(None, "true: base weights stored in bfloat16 (dtype: bfloat16); false: float32 where "
                                  "dtype is auto; null: as dtype says. Adapters, heads and optimizer state stay "
                                  "float32, no autocast (docs/scaling.md, \"Precision\").")

    RENAMED = RENAMED
    SAVE_STEPS = 50  # save_steps: null with LoRA

    def __post_init__(self):
        super().__post_init__()
        if self.save_steps is None:  # full fine-tuning: a checkpoint is a whole model, so only the last one
            self.save_steps = self.SAVE_STEPS if getattr(self, "use_peft", True) else 0
        _finite(self)
        if self.bf16:
            if self.dtype not in ("auto", "float32", "bfloat16"):  # float32: the default before auto
                raise ValueError(f"bf16: true contradicts dtype: {self.dtype}")
            self.dtype = "bfloat16"
        elif self.bf16 is False and self.dtype == "auto":
            self.dtype = "float32"
        _positive(self, "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                  "gradient_accumulation_steps", "num_train_epochs", "logging_steps", "save_total_limit",
                  "max_grad_norm")
        _at_least_zero(self, "weight_decay", "warmup_steps", "eval_steps", "save_steps")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"max_steps: expected a positive number of steps or -1 (use num_train_epochs), "
                             f"got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: expected a fraction in [0, 1), got {self.warmup_ratio}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"lr_scheduler_type: expected one of {list(SCHEDULERS)}, got {self.lr_scheduler_type!r}")
        check_report_to(self.report_to)
        if self.lora_r not in RECOMMENDED_RANKS:
            warnings.warn(f"lora_r={self.lora_r}: ranks 4-8 are enough for RL and preference tuning", stacklevel=3)

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps or math.ceil(self.warmup_ratio * total_steps)


def check_fraction(max_bad_fraction: float) -> None:
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction: expected in [0, 1], got {max_bad_fraction}")


@dataclass
class PreferenceDataConfig:
    train_file: str = arg("", "Preference data: .jsonl/.json/.parquet/.csv, a save_to_disk folder, a folder of "
                              "data files, or a dataset name for datasets.load_dataset.")
    eval_file: str | None = arg(None, "Held-out preference data (optional; any source train_file takes; a "
                                      "dataset name or DatasetDict gives its 'test' split).")
    dataset_name: str = arg("", "Instead of train_file: a dataset name for datasets.load_dataset (TRL's name; "
                                "offline it must be in the local datasets cache).")
    dataset_config: str | None = arg(None, "The dataset's configuration (datasets.load_dataset's second argument).")
    dataset_split: str = arg("train", "The split to train on, for a dataset name or a saved DatasetDict.")
    eval_fraction: float = arg(0.0, "Without eval_file: this fraction of the training rows is held out.")
    format: str = arg("auto", "auto | standard | conversational.")
    on_bad_rows: str = arg("error", "error (abort, listing every bad row) | skip (drop and count them).")
    max_bad_fraction: float = arg(0.1, "With on_bad_rows: skip, stop before training when more than this fraction "
                                       "of the rows are bad.")
    chat_template: bool = arg(False, "String (standard) rows: false (default) tokenises them as plain text, as TRL's "
                                     "DPOTrainer does; true writes them as a user turn and an assistant turn "
                                     "through the tokenizer's chat template. Message rows always use the template.")
    max_length: int = arg(256, "Token budget for prompt + answer; answers are truncated to fit.")

    # Config fields for data, and the argument that takes the rows themselves in Python (TRL's names).
    PYTHON_DATA = {"train_file": "train_dataset", "eval_file": "eval_dataset", "dataset_name": "train_dataset"}

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent:
            parent()
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected in [0, 1), got {self.eval_fraction}")
        if self.on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows: expected 'error' or 'skip', got {self.on_bad_rows!r}")
        check_fraction(self.max_bad_fraction)
        if self.format not in ("auto", "standard", "conversational"):
            raise ValueError(f"format: expected auto, standard or conversational, got {self.format!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length: expected at least 2, got {self.max_length}")
        if self.train_file and self.dataset_name:
            raise ValueError("train_file and dataset_name: choose one")

    def train_source(self) -> str:
        """Where the training rows come from: train_file, else dataset_name ('' when neither is set)."""
        return self.train_file or self.dataset_name

    def check_batch(self) -> None:
        pairs = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if pairs > LARGE_BATCH:
            warnings.warn(f"effective batch {pairs} pairs: LoRA pays more than full fine-tuning at large "
                          "batches; consider fewer pairs per step", stacklevel=3)
