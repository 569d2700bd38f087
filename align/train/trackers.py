"""`report_to` backends: TensorBoard, Weights & Biases, Trackio, MLflow, through the libraries themselves.

metrics.jsonl is always written (align.train.metrics); these mirror each logged row. Each library
is imported only when a run reports to it, and `check_report_to` runs at config check, so a
missing one is one line naming the extra to install before any model loads.

Dashboard names follow transformers' Trainer callbacks, so a run sits next to a TRL run in
the same dashboard: TensorBoard, W&B and Trackio get `train/<name>` (`eval/<name>` stays as
it is); MLflow gets the names unchanged, as transformers' MLflow callback logs them.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

# report_to name -> (module that must import, the align-lora extra that installs it)
BACKENDS = {
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}
REPORTERS = (*BACKENDS, "none")


def check_report_to(report_to: list[str]) -> None:
    """Raise ValueError (one line) for an unknown name or a backend whose library is not installed."""
    if not report_to or any(r not in REPORTERS for r in report_to):
        raise ValueError(f"report_to: expected a list of {list(REPORTERS)}, got {report_to!r}")
    if "none" in report_to and len(report_to) > 1:
        raise ValueError(f"report_to: 'none' cannot be combined with other backends, got {report_to!r}")
    for name in report_to:
        if name == "none":
            continue
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            how = f"pip install 'align-lora[{extra}]'" if extra else f"pip install {module}"
            raise ValueError(f"report_to: {name} needs the {module} package, which is not installed ({how})")


def dashboard_name(key: str) -> str:
    """transformers' rewrite_logs: `eval/x` stays, everything else becomes `train/x`."""
    return key if key.startswith(("eval/", "test/")) else f"train/{key}"


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row, without its step."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(dashboard_name(k), v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _RunTracker:
    """A wandb or trackio run: both take dashboard names, a step, and finish()."""

    run = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({dashboard_name(k): v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class WandbTracker(_RunTracker):
    """W&B run in the run folder (wandb/); offline with WANDB_MODE=offline, as wandb itself reads it."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "align"), name=run_name, dir=str(run_dir),
                              config=config, reinit="create_new")


class TrackioTracker(_RunTracker):
    """Trackio run (a local SQLite database under TRACKIO_DIR unless a Space is configured)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "align"), name=run_name, config=config,
                                auto_log_cpu=False, auto_log_gpu=False)


class MLflowTracker:
    """MLflow run (MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME as mlflow reads them)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
            "mlflow": MLflowTracker}


def open_trackers(report_to: list[str], run_dir: str | os.PathLike, config: dict | None = None) -> list:
    """One tracker per backend named in `report_to` ('none' and an empty list: none)."""
    check_report_to(list(report_to) or ["none"])
    run_dir = Path(run_dir)
    return [TRACKERS[name](run_dir, run_dir.resolve().name, dict(config or {}))
            for name in report_to if name != "none"]
