"""DPO end to end on a tiny model: only the adapter learns, resume is exact, failures are clean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align_main
from align.config import load_config
from align.dpo import DPOConfig, DPOTrainer, train_dpo
from align.errors import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "dpo_tiny.yaml"
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"


def tiny_config(model, out, **over) -> DPOConfig:
    sets = [f"model={model}", f"output_dir={out}", f"train_file={DATA}", "tensorboard=false"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(DPOConfig, TINY_CONFIG, sets)


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_only_adapter_changes_and_base_is_bit_identical(tiny_llama, tmp_path):
    trainer = DPOTrainer(tiny_config(tiny_llama, tmp_path / "run", epochs=1, save_every=0))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.base.base_parameters().items()}
    adapter_before = {n: p.detach().clone() for n, p in trainer.base.adapter_parameters("policy").items()}
    trainer.train()
    after = trainer.base.base_parameters()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a base weight changed"
    changed = [n for n, p in trainer.base.adapter_parameters("policy").items()
               if not torch.equal(adapter_before[n], p)]
    assert len(changed) == len(adapter_before)  # every A and B matrix moved
    # Parameters the optimizer holds are exactly the adapter's.
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in trainer.base.adapter_parameters("policy").values()}


def test_cli_end_to_end(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    code = align_main(["dpo", "--config", str(TINY_CONFIG), "--set", f"model={tiny_llama}",
                       "--set", f"output_dir={out}", "--set", f"train_file={DATA}"])
    assert code == 0
    assert f"adapter saved to {out / 'adapter'}" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((out / "adapter").glob("*.bin"))
    meta = json.loads((out / "adapter" / "align_meta.json").read_text())
    assert meta["base"] == str(tiny_llama) and meta["lora"]["rank"] == 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    # the model learns the (easy) preference: training loss falls and held-out accuracy is high
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["eval/rewards/accuracy"] >= 0.8 and final["eval/rewards/margin"] > 0
    assert (out / "config.yaml").is_file() and list((out / "tb").iterdir())


def test_cli_reports_bad_data_and_config(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    base_args = ["dpo", "--config", str(TINY_CONFIG), "--set", f"model={tiny_llama}",
                 "--set", f"output_dir={tmp_path / 'run'}"]
    assert align_main(base_args + ["--set", f"train_file={bad}"]) == 2
    assert f"{bad}:2: field 'rejected': missing" in capsys.readouterr().err
    assert align_main(base_args + ["--set", "betta=0.3"]) == 2
    assert "betta: unknown key" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_file: x.jsonl\nbeta: 0.1\nlora:\n  rank: 8\n  alpah: 16\n")
    assert align_main(["dpo", "--config", str(cfg)]) == 2
    assert f"{cfg}:5: lora.alpah: unknown key" in capsys.readouterr().err


def test_resume_after_kill_equals_uninterrupted(tiny_llama, tmp_path, monkeypatch):
    full = train_dpo(tiny_config(tiny_llama, tmp_path / "full", save_every=2))

    killed_dir = tmp_path / "killed"
    trainer = DPOTrainer(tiny_config(tiny_llama, killed_dir, save_every=2))
    trainer.setup()
    real_step = trainer.train_step

    def step_then_die():
        if trainer.step == 3:  # checkpoint at step 2 exists; step 3's work is lost
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(trainer, "train_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (killed_dir / "checkpoints" / "LATEST").read_text() == "step-000002"

    resumed = train_dpo(tiny_config(tiny_llama, killed_dir, save_every=2), resume=True)
    a, b = adapter_tensors(full), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the uninterrupted one"
    steps = [json.loads(x)["step"] for x in (killed_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps))  # no duplicated steps in the curve after resume


def test_precomputed_reference_gives_the_same_training(tiny_llama, tmp_path):
    a = train_dpo(tiny_config(tiny_llama, tmp_path / "a", max_steps=3, save_every=0))
    b = train_dpo(tiny_config(tiny_llama, tmp_path / "b", max_steps=3, save_every=0, precompute_ref=True))
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5
    assert (tmp_path / "b" / "ref_logprobs.safetensors").is_file()


def test_divergence_stops_and_keeps_last_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tiny_llama, out, learning_rate=1.0e30, save_every=1, max_grad_norm=1.0e38)
    with pytest.raises(TrainingDiverged, match=r"step \d+: .* is (nan|inf)"):
        train_dpo(config)
    latest = (out / "checkpoints" / "LATEST").read_text()
    ck = out / "checkpoints" / latest
    assert (ck / "state.json").is_file() and (ck / "adapters" / "policy" / "adapter_model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".*tmp*"))  # nothing half-written left behind
    assert not (out / "adapter").exists()  # no final adapter from a diverged run
    shutil.rmtree(out)
