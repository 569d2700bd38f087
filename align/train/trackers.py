"""`report_to` backends through accelerate.tracking's tracker classes.

metrics.jsonl is always written (align.train.metrics); these mirror each logged row. The names
are accelerate's (`LoggerType`): tensorboard, wandb, trackio, mlflow, comet_ml, aim, clearml,
dvclive, swanlab. `check_report_to` runs at config check and asks accelerate which packages it
finds (`filter_trackers`), so a missing one is one line naming the extra to install before any
model loads; accelerate itself would silently drop it.

Dashboard names follow transformers' Trainer callbacks, so a run sits next to a TRL run in the
same dashboard: `train/<name>` (`eval/<name>` stays as it is), except MLflow, which gets the
names unchanged as transformers' MLflow callback logs them, and ClearML, whose accelerate
tracker plots `<name>` with a `train` and an `eval` series.

Only the main process writes: align.train.lifecycle opens trackers on rank 0 alone, so accelerate's
own main-process gate is switched off per tracker (docs/design.md, "Trackers").
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# report_to name -> the align-lora extra that installs its package (TensorBoard is a dependency).
# tests/test_trackers.py checks these are exactly accelerate's LoggerType names.
EXTRAS = {
    "tensorboard": None,
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
REPORTERS = (*EXTRAS, "none")


def check_report_to(report_to: list[str]) -> None:
    """Raise ValueError (one line) for an unknown name or a backend accelerate cannot find."""
    if not report_to or any(r not in REPORTERS for r in report_to):
        raise ValueError(f"report_to: expected a list of {list(REPORTERS)}, got {report_to!r}")
    if "none" in report_to and len(report_to) > 1:
        raise ValueError(f"report_to: 'none' cannot be combined with other backends, got {report_to!r}")
    wanted = [r for r in report_to if r != "none"]
    if not wanted:
        return
    from accelerate.tracking import filter_trackers

    found = {t.value for t in filter_trackers(wanted, logging_dir=".")}
    for name in wanted:
        if name not in found:
            how = f"pip install 'align-lora[{EXTRAS[name]}]'" if EXTRAS[name] else f"pip install {name}"
            raise ValueError(f"report_to: {name} needs the {name} package, which is not installed "
                             f"or not a version accelerate supports ({how})")


def dashboard_name(key: str) -> str:
    """transformers' rewrite_logs: `eval/x` stays, everything else becomes `train/x`."""
    return key if key.startswith(("eval/", "test/")) else f"train/{key}"


def clearml_name(key: str) -> str:
    """accelerate's ClearML tracker reads an `eval_` prefix as the `eval` series of the plot `<name>`."""
    return "eval_" + key[len("eval/"):] if key.startswith("eval/") else key


RENAMES = {"mlflow": str, "clearml": clearml_name}  # str: unchanged; the rest: dashboard_name
CONFIG_AFTER_START = {"mlflow", "comet_ml", "aim", "clearml", "dvclive"}  # the rest take it in their init


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row, without its step."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def _project(variable: str) -> str:
    return os.environ.get(variable, "align")


def accelerate_tracker(name: str, run_dir: Path, run_name: str, config: dict):
    """accelerate's tracker for `name`, with the folders, projects and run names align uses."""
    from accelerate import tracking as t

    if name == "tensorboard":  # <run>/tb, as before accelerate: its folder is logging_dir/run_name
        return t.TensorBoardTracker("tb", run_dir)
    if name == "wandb":  # accelerate passes its first argument as the W&B project
        return t.WandBTracker(_project("WANDB_PROJECT"), name=run_name, dir=str(run_dir), config=config,
                              reinit="create_new")
    if name == "trackio":
        return t.TrackioTracker(_project("TRACKIO_PROJECT"), name=run_name, config=config,
                                auto_log_cpu=False, auto_log_gpu=False)
    if name == "mlflow":  # MLFLOW_EXPERIMENT_NAME wins, as accelerate reads it; else mlflow's own default
        return t.MLflowTracker(experiment_name="Default", run_name=run_name)
    if name == "comet_ml":
        return t.CometMLTracker(_project("COMET_PROJECT_NAME"))
    if name == "aim":  # the Aim repository sits in the run folder
        return t.AimTracker(run_name, run_dir)
    if name == "clearml":
        return t.ClearMLTracker(run_name, project_name=_project("CLEARML_PROJECT"),
                                task_name=os.environ.get("CLEARML_TASK", run_name))
    if name == "dvclive":
        return t.DVCLiveTracker(dir=str(run_dir / "dvclive"))
    if name == "swanlab":
        return t.SwanLabTracker(_project("SWANLAB_PROJECT"), experiment_name=run_name, config=config)
    raise ValueError(f"report_to: unknown backend {name!r}")


def ensure_accelerate_state() -> None:
    """accelerate's trackers log through its process-aware logger, which raises without its state.

    Several processes: align.core.distributed made the state already. One process has no peers,
    so the state is made without the launcher's LOCAL_RANK: with it (torchrun --nproc_per_node 1)
    accelerate starts a process group of one for a run that never communicates (docs/design.md).
    """
    from accelerate.state import PartialState

    if PartialState._shared_state:
        return
    local_rank = os.environ.pop("LOCAL_RANK", None)
    try:
        PartialState(cpu=True)
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank


class Tracker:
    """One of accelerate's trackers, fed the names its dashboards expect."""

    def __init__(self, name: str, backend):
        self.name = name
        self.backend = backend
        self.rename = RENAMES.get(name, dashboard_name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.backend.log({self.rename(k): v for k, v in metrics.items()}, step=step)

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        """A table (e.g. log_completions'), to backends that take one (W&B); the others skip it."""
        log_table = getattr(self.backend, "log_table", None)
        if log_table is None or not rows:
            return
        columns = list(rows[0])
        log_table(name, columns=columns, data=[[r.get(c) for c in columns] for r in rows], step=step)

    def close(self) -> None:
        self.backend.finish()


def open_trackers(report_to: list[str], run_dir: str | os.PathLike, config: dict | None = None) -> list[Tracker]:
    """One started tracker per backend named in `report_to` ('none' and an empty list: none)."""
    check_report_to(list(report_to) or ["none"])
    run_dir = Path(run_dir)
    config = dict(config or {})
    opened = []
    if any(name != "none" for name in report_to):
        ensure_accelerate_state()
    try:
        for name in report_to:
            if name == "none":
                continue
            backend = accelerate_tracker(name, run_dir, run_dir.resolve().name, config)
            backend.main_process_only = False  # the caller is the one writer (see the module's docstring)
            backend.start()
            if name in CONFIG_AFTER_START:
                backend.store_init_configuration(config)
            opened.append(Tracker(name, backend))
    except BaseException:
        for tracker in opened:  # a backend that fails to start does not leave the others' runs open
            tracker.close()
        raise
    return opened
