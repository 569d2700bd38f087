"""report_to: a real DPO run logged through accelerate's trackers to a real TensorBoard event file and a
real Trackio database, both read back and compared with metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import uuid
from pathlib import Path

import accelerate.tracking
import pytest
from accelerate.utils import LoggerType

from align.recipes.dpo import DPOConfig, DPOTrainer
from align.train.config_parser import load_config
from align.train.trackers import EXTRAS, check_report_to, clearml_name, dashboard_name

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"
TRL_DPO_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "epoch"}
HAS_TRACKIO = importlib.util.find_spec("trackio") is not None


def _trackio_rows(db: Path) -> dict[int, dict]:
    with sqlite3.connect(db) as con:
        return {step: json.loads(m) for step, m in con.execute("select step, metrics from metrics order by id")}


def _tensorboard_rows(folder: Path) -> dict[int, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    rows: dict[int, dict] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            rows.setdefault(event.step, {})[tag] = event.value
    return rows


def _same_as_jsonl(jsonl: list[dict], logged: dict[int, dict], rel: float) -> None:
    assert sorted(logged) == [r["step"] for r in jsonl]
    for row in jsonl:
        got = logged[row["step"]]
        # TRL's names under transformers' dashboard prefixes: train/<name>, eval/<name>
        assert {dashboard_name(k) for k in TRL_DPO_NAMES} <= set(got)
        want = {dashboard_name(k): v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=rel, abs=1e-9), k
    assert "eval/rewards/accuracies" in logged[2] and "train/rewards/accuracies" in logged[2]


def test_dpo_run_reports_to_tensorboard_and_trackio(tiny_llama, tmp_path, monkeypatch):
    # Trackio reads TRACKIO_DIR when first imported; a project of its own keeps the rows apart either way.
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    project = f"align-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TRACKIO_PROJECT", project)
    monkeypatch.setenv("LOCAL_RANK", "0")  # as torchrun --nproc_per_node 1 sets it: still no process group
    backends = ["tensorboard", "trackio"] if HAS_TRACKIO else ["tensorboard"]
    out = tmp_path / "run"
    sets = [f"model_name_or_path={tiny_llama}", f"output_dir={out}", f"train_file={DATA}",
            f"report_to=[{','.join(backends)}]", "max_steps=2", "save_steps=0", "eval_fraction=0.25"]
    DPOTrainer(load_config(DPOConfig, REPO / "configs" / "dpo_tiny.yaml", sets)).train()

    import torch.distributed

    assert not torch.distributed.is_initialized() and os.environ["LOCAL_RANK"] == "0"
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2]
    assert TRL_DPO_NAMES <= set(jsonl[0])
    # The layout of before accelerate: one event file right in <run>/tb, no hparams sub-run.
    assert [p.name.split(".")[0] for p in (out / "tb").iterdir()] == ["events"]
    _same_as_jsonl(jsonl, _tensorboard_rows(out / "tb"), rel=1e-6)  # event files hold float32
    if not HAS_TRACKIO:
        pytest.skip("TensorBoard checked; the trackio extra is not installed (scripts/setup.sh installs it)")
    import trackio.utils

    db = Path(trackio.utils.TRACKIO_DIR) / f"{project}.db"
    logged = _trackio_rows(db)
    if tmp_path not in db.parents:
        db.unlink()
    _same_as_jsonl(jsonl, logged, rel=1e-6)


def test_only_what_report_to_names(tmp_path):
    from align.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, report_to=["none"])
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_mlflow_gets_the_names_unchanged_at_our_steps(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from align.train.metrics import MetricsLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses its file store without it
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    logger = MetricsLogger(tmp_path / "my-run", ["mlflow"], config={"learning_rate": 1e-4, "report_to": ["mlflow"]})
    logger.log(3, {"loss": 0.5, "rewards/margins": 0.25})
    logger.log(4, {"loss": 0.375, "eval/loss": 0.5})
    logger.close()
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.run_name == "my-run" and run.data.params["learning_rate"] == "0.0001"
    client = mlflow.MlflowClient()
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    assert history == {"loss": [(3, 0.5), (4, 0.375)], "rewards/margins": [(3, 0.25)], "eval/loss": [(4, 0.5)]}


def test_every_accelerate_backend_is_a_report_to_name_with_an_extra():
    assert set(EXTRAS) == {t.value for t in LoggerType} - {"all"}
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, extra in EXTRAS.items():
        assert extra is None or extra in extras, f"{name}: no align-lora[{extra}] extra in pyproject.toml"


def test_dashboard_names():
    assert dashboard_name("rewards/margins") == "train/rewards/margins"
    assert dashboard_name("eval/rewards/margins") == "eval/rewards/margins"
    assert clearml_name("eval/loss") == "eval_loss" and clearml_name("loss") == "loss"


def _without(monkeypatch, name: str) -> None:
    """accelerate as it is where `name`'s package is not installed (it lists what it finds at import)."""
    kept = [t for t in accelerate.tracking.get_available_trackers() if t.value != name]
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", kept)


def test_missing_library_is_one_line_naming_the_extra(monkeypatch):
    _without(monkeypatch, "mlflow")
    with pytest.raises(ValueError, match=r"report_to: mlflow needs .*pip install 'align-lora\[mlflow\]'"):
        check_report_to(["mlflow"])
    _without(monkeypatch, "comet_ml")
    with pytest.raises(ValueError, match=r"report_to: comet_ml needs .*align-lora\[comet_ml\]"):
        check_report_to(["tensorboard", "comet_ml"])
    check_report_to(["tensorboard"])  # installed: no error
    with pytest.raises(ValueError, match="report_to: expected a list of"):
        check_report_to(["neptune"])
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        check_report_to(["none", "tensorboard"])


def test_missing_library_stops_the_cli_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from align.cli import main as align_main

    _without(monkeypatch, "wandb")
    code = align_main(["dpo", "--config", str(REPO / "configs" / "dpo_tiny.yaml"), "--model_name_or_path",
                       str(tmp_path / "no-model-here"), "--output_dir", str(tmp_path / "run"), "--set",
                       f"train_file={DATA}", "--report_to", "wandb"])
    err = capsys.readouterr().err
    assert code != 0 and "align-lora[wandb]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
