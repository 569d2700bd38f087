"""What a resume compares: the settings and the process count a checkpoint was written with, against now.

Every checkpoint's state.json records the resolved config ("config") and the number of processes
("world"). On --resume:

- a field that changes the training differs -> refused, one message listing each "field: was X, now Y";
  `--resume_changed` accepts the new values and records them in config_history.yaml (config.yaml
  keeps the config the run started with, loadable by --config);
- a field in HARMLESS differs -> accepted silently (where files go, how often to log or save, placement);
- max_steps or num_train_epochs grows -> accepted (extending a run), said in one line and recorded;
- another number of processes -> gradient_accumulation_steps is changed so that per-device batch x
  accumulation x processes (the global batch) stays what it was, said in one line and recorded; where no
  whole accumulation keeps it, refused in one line;
- a checkpoint that records no config (written before this module) resumes as before, with a note;
- a field naming a local file (train_file, eval_file, prompts, ...) is recorded with its content's digest
  ("train_file content"), so a file edited in place since the checkpoint is a difference like any other.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import stat
from pathlib import Path

import yaml

from align.core.errors import UserError

HISTORY = "config_history.yaml"

# Fields whose change leaves the training itself as it was: where outputs go, how often to log, evaluate or
# save, how many threads or how much memory, where the base sits, where a remote engine is reached.
HARMLESS = frozenset({
    "output_dir", "report_to", "logging_steps", "save_steps", "save_total_limit", "eval_steps",
    "per_device_eval_batch_size", "num_threads", "heap_mmap_threshold_mb", "device", "gradient_checkpointing",
    "checkpoint_keep_last", "log_completions", "num_completions_to_print", "engine_api_key_env",
    "engine_adapter_dir", "vllm_server_base_url", "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode",
    "num_eval_prompts",
})
# Fields a run may grow on resume without --resume_changed: extending a run is a common wish.
EXTENDABLE = ("max_steps", "num_train_epochs")


def config_record(config) -> dict:
    """The resolved config as state.json holds it (a JSON round trip, so tuples and lists compare equal), plus
    "FIELD content": the digest of each local file a training field names (its path alone would not show an edit)."""
    record = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    for field, value in list(record.items()):
        digest = file_digest(value) if field not in HARMLESS and isinstance(value, str) and value else None
        if digest:
            record[f"{field} content"] = digest
    return record


def file_digest(path: str) -> str | None:
    """'sha256:' + 16 hex digits of a regular file's bytes; None for anything else (a folder, a dataset name)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return _digest(os.path.realpath(path), st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """Hashed once per (file, size, mtime): every checkpoint records it, and files can be large."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def grad_accum_for_world(per_device: int, grad_accum: int, old_world: int, new_world: int) -> int | None:
    """The accumulation that keeps per_device x grad_accum x old_world on new_world processes; None if none does."""
    global_batch = per_device * grad_accum * old_world
    share = per_device * new_world
    return global_batch // share if global_batch % share == 0 else None


def extended(field: str, old, new, recorded: dict) -> bool:
    """Whether changing `field` from old to new only makes the run longer (max_steps, or epochs with no max_steps)."""
    if field == "max_steps":
        return isinstance(old, int) and isinstance(new, int) and 0 < old < new
    if field == "num_train_epochs":
        return recorded.get("max_steps", -1) == -1 and isinstance(old, int) and isinstance(new, int) and old < new
    return False


def same(old, new) -> bool:
    """Equal values, or two spellings of one existing file or folder (relative and absolute, say)."""
    if old == new:
        return True
    if not (isinstance(old, str) and isinstance(new, str) and old and new):
        return False
    try:
        return os.path.samefile(old, new)
    except (OSError, ValueError):
        return False


def differences(recorded: dict, current: dict) -> dict[str, list]:
    """{field: [old, new]} for the fields both configs have, outside HARMLESS, whose values differ.

    A field only one side has (a config written by another version of align) is not a difference.
    """
    return {k: [recorded[k], current[k]] for k in current
            if k in recorded and k not in HARMLESS and not same(recorded[k], current[k])}


def keep_global_batch(config, recorded: dict, old_world: int, world: int, accept: bool, name: str, say) -> dict:
    """On another process count, set config.gradient_accumulation_steps to keep the recorded global batch.

    Returns what changed ({field: [old, new]}); a user who already gave the fitting accumulation changes nothing.
    """
    per, accum = recorded["per_device_train_batch_size"], recorded["gradient_accumulation_steps"]
    fitting = grad_accum_for_world(per, accum, old_world, world)
    given = config.gradient_accumulation_steps
    if given not in (accum, fitting):
        return {}  # the user chose another accumulation: compared, and listed, as any other field
    if fitting is None:
        if not accept:
            raise UserError(f"--resume: checkpoint {name} was trained by {old_world} processes with a global batch "
                            f"of {per} x {accum} x {old_world} = {per * accum * old_world}; on {world} processes no "
                            f"gradient_accumulation_steps keeps it ({per} x {world} does not divide it); run on "
                            f"{old_world} processes, or pass --resume_changed to train on with another global batch")
        return {}
    config.gradient_accumulation_steps = fitting
    say(f"[align] checkpoint {name} was trained by {old_world} processes, this run has {world}: "
        f"gradient_accumulation_steps {accum} -> {fitting} keeps the global batch of {per * accum * old_world}")
    return {"gradient_accumulation_steps": [accum, fitting]}


def check_resume(config, state: dict, world: int, accept: bool, name: str, say=print) -> dict | None:
    """Compare the run about to resume with checkpoint `name` (its `state`); returns the history entry to record.

    Raises UserError listing every training setting that differs, unless `accept` (--resume_changed).
    May set config.gradient_accumulation_steps (another process count, see keep_global_batch).
    """
    recorded = state.get("config")
    if not isinstance(recorded, dict):
        say(f"[align] checkpoint {name} records no config (written before resumes compared settings); "
            f"resuming without comparing them")
        return None
    old_world = state.get("world", 1)
    changed = {}
    if old_world != world:
        changed["world_size"] = [old_world, world]
        changed.update(keep_global_batch(config, recorded, old_world, world, accept, name, say))
    diffs = differences(recorded, config_record(config))
    if "gradient_accumulation_steps" in changed:  # set by keep_global_batch, said there
        diffs.pop("gradient_accumulation_steps", None)
    refused = {k: v for k, v in diffs.items() if not extended(k, *v, recorded)}
    listed = "\n  ".join(f"{k}: was {old!r}, now {new!r}" for k, (old, new) in refused.items())
    if refused and not accept:
        raise UserError(f"--resume: {len(refused)} setting(s) differ from checkpoint {name}'s:\n  {listed}\n"
                        f"Resume with the checkpoint's settings, or pass --resume_changed (resume_changed=True in "
                        f"Python) to train on with the new ones (recorded in {HISTORY})")
    if refused:
        say(f"[align] --resume_changed: training on from {name} with changed settings (recorded in {HISTORY}):"
            f"\n  {listed}")
    for k in diffs.keys() - refused.keys():
        say(f"[align] {k}: {diffs[k][0]} -> {diffs[k][1]}, extending the run from checkpoint {name} "
            f"(the learning-rate schedule is stretched to the new length)")
    changed.update(diffs)
    return {"step": state["step"], "changed": changed} if changed else None


def record_history(run_dir: Path, entry: dict) -> None:
    """Append `entry` to config_history.yaml; a resume retried from the same checkpoint replaces its own entry."""
    from align.core.atomic import atomic_write_text

    path = Path(run_dir) / HISTORY
    history = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    if history and history[-1].get("step") == entry["step"]:
        history.pop()
    atomic_write_text(path, yaml.safe_dump(history + [entry], sort_keys=False))
