"""report_to: a real DPO run logged to a real Trackio database, read back and compared with metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import uuid
from pathlib import Path

import pytest

from align.recipes.dpo import DPOConfig, DPOTrainer
from align.train.config_parser import load_config
from align.train.trackers import BACKENDS, check_report_to, dashboard_name

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"
TRL_DPO_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "epoch"}


def _rows(db: Path) -> dict[int, dict]:
    with sqlite3.connect(db) as con:
        return {step: json.loads(m) for step, m in con.execute("select step, metrics from metrics order by id")}


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None,
                    reason="the trackio extra is not installed (scripts/setup.sh installs it)")
def test_dpo_run_reports_to_trackio(tiny_llama, tmp_path, monkeypatch):
    # Trackio reads TRACKIO_DIR when first imported; a project of its own keeps the rows apart either way.
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    project = f"align-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TRACKIO_PROJECT", project)
    out = tmp_path / "run"
    sets = [f"model_name_or_path={tiny_llama}", f"output_dir={out}", f"train_file={DATA}", "report_to=[trackio]",
            "max_steps=2", "save_steps=0", "eval_fraction=0.25"]
    DPOTrainer(load_config(DPOConfig, REPO / "configs" / "dpo_tiny.yaml", sets)).train()

    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2]
    assert TRL_DPO_NAMES <= set(jsonl[0])
    assert not (out / "tb").exists()  # only what report_to names
    import trackio.utils

    db = Path(trackio.utils.TRACKIO_DIR) / f"{project}.db"
    logged = _rows(db)
    if tmp_path not in db.parents:
        db.unlink()
    assert sorted(logged) == [1, 2]
    for row in jsonl:
        got = logged[row["step"]]
        # TRL's names under transformers' dashboard prefixes: train/<name>, eval/<name>
        assert {dashboard_name(k) for k in TRL_DPO_NAMES} <= set(got)
        want = {dashboard_name(k): v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert "eval/rewards/accuracies" in logged[2] and "train/rewards/accuracies" in logged[2]


def test_missing_library_is_one_line_naming_the_extra(monkeypatch):
    # A backend whose module is absent (as mlflow is when its extra is not installed).
    monkeypatch.setitem(BACKENDS, "mlflow", ("align_no_such_module", "mlflow"))
    with pytest.raises(ValueError, match=r"report_to: mlflow needs .*pip install 'align-lora\[mlflow\]'"):
        check_report_to(["mlflow"])
    with pytest.raises(ValueError, match="report_to: expected a list of"):
        check_report_to(["neptune"])
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        check_report_to(["none", "tensorboard"])


def test_missing_library_stops_the_cli_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from align.cli import main as align_main

    monkeypatch.setitem(BACKENDS, "wandb", ("align_no_such_module", "wandb"))
    code = align_main(["dpo", "--config", str(REPO / "configs" / "dpo_tiny.yaml"), "--model_name_or_path",
                       str(tmp_path / "no-model-here"), "--output_dir", str(tmp_path / "run"), "--set",
                       f"train_file={DATA}", "--report_to", "wandb"])
    err = capsys.readouterr().err
    assert code != 0 and "align-lora[wandb]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
