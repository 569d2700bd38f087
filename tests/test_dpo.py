"""DPO end to end on a tiny model: only the adapter learns, resume is exact, failures are clean."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align_main
from align.core.errors import TrainingDiverged
from align.recipes.dpo import DPOConfig, DPOTrainer, train_dpo
from align.train.config_parser import load_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "dpo_tiny.yaml"
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"


def tiny_config(model, out, **over) -> DPOConfig:
    sets = [f"model_name_or_path={model}", f"output_dir={out}", f"train_file={DATA}", "report_to=[none]"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(DPOConfig, TINY_CONFIG, sets)


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_only_adapter_changes_and_base_is_bit_identical(tiny_llama, tmp_path):
    trainer = DPOTrainer(tiny_config(tiny_llama, tmp_path / "run", num_train_epochs=1, save_steps=0))
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
    code = align_main(["dpo", "--config", str(TINY_CONFIG), "--model_name_or_path", str(tiny_llama),
                       "--output_dir", str(out), "--set", f"train_file={DATA}"])
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
    assert final["eval/rewards/accuracies"] >= 0.8 and final["eval/rewards/margins"] > 0
    # TRL's names, so dashboards built for TRL read these runs
    assert {"learning_rate", "grad_norm", "epoch", "rewards/margins", "logps/chosen"} <= set(steps[0])
    assert (out / "config.yaml").is_file() and list((out / "tb").iterdir())


def test_cli_reports_bad_data_and_config(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    base_args = ["dpo", "--config", str(TINY_CONFIG), "--set", f"model_name_or_path={tiny_llama}",
                 "--set", f"output_dir={tmp_path / 'run'}"]
    assert align_main(base_args + ["--set", f"train_file={bad}"]) == 2
    assert f"{bad}:2: field 'rejected': missing" in capsys.readouterr().err
    assert align_main(base_args + ["--set", "betta=0.3"]) == 2
    assert "betta: unknown key" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_file: x.jsonl\nbeta: 0.1\nlora_r: 8\nlora_alpah: 16\n")
    assert align_main(["dpo", "--config", str(cfg)]) == 2
    assert f"{cfg}:4: lora_alpah: unknown key" in capsys.readouterr().err


def test_precomputed_reference_gives_the_same_training(tiny_llama, tmp_path):
    a = train_dpo(tiny_config(tiny_llama, tmp_path / "a", max_steps=3, save_steps=0))
    b = train_dpo(tiny_config(tiny_llama, tmp_path / "b", max_steps=3, save_steps=0, precompute_ref_log_probs=True))
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5
    assert (tmp_path / "b" / "ref_logprobs.safetensors").is_file()


def test_divergence_stops_and_keeps_last_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tiny_llama, out, learning_rate=1.0e30, save_steps=1, max_grad_norm=1.0e38)
    with pytest.raises(TrainingDiverged, match=r"step \d+: .* is (nan|inf)"):
        train_dpo(config)
    latest = (out / "checkpoints" / "LATEST").read_text()
    ck = out / "checkpoints" / latest
    assert (ck / "state.json").is_file() and (ck / "adapters" / "policy" / "adapter_model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".*tmp*"))  # nothing half-written left behind
    assert not (out / "adapter").exists()  # no final adapter from a diverged run
    shutil.rmtree(out)


def lr_sequence(tiny_llama, out, steps, **over) -> list[float]:
    """The learning rate of each optimizer step of a run, read off the trainer's own scheduler."""
    trainer = DPOTrainer(tiny_config(tiny_llama, out, learning_rate=1.0, max_steps=steps, **over))
    trainer.setup()
    lrs = []
    for _ in range(steps):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()  # no gradients: moves nothing, keeps the scheduler's order check quiet
        trainer.scheduler.step()
    trainer.close()
    return lrs


def test_learning_rate_schedules_by_hand(tiny_llama, tmp_path):
    # linear, 2 warm-up steps of 10: 0/2, 1/2, then (10 - s) / 8 from s = 2: 1, 7/8, ..., 1/8
    linear = lr_sequence(tiny_llama, tmp_path / "a", 10, warmup_steps=2)
    assert linear == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    # warmup_ratio 0.2 of 10 steps is the same 2 steps
    assert lr_sequence(tiny_llama, tmp_path / "b", 10, warmup_ratio=0.2) == pytest.approx(linear)
    # cosine without warm-up: 0.5 * (1 + cos(pi * s / 10)); s = 5 -> 0.5
    cosine = lr_sequence(tiny_llama, tmp_path / "c", 10, lr_scheduler_type="cosine")
    assert cosine[0] == pytest.approx(1.0) and cosine[5] == pytest.approx(0.5) and cosine[9] < 0.03
    assert lr_sequence(tiny_llama, tmp_path / "d", 4, lr_scheduler_type="constant") == [1.0] * 4


def test_reference_cache_is_keyed_on_what_it_depends_on(tiny_llama, tmp_path):
    from align.core.tiny import build_tiny_model

    def computed(out, **over) -> bool:
        trainer = DPOTrainer(tiny_config(tiny_llama, out, precompute_ref_log_probs=True, **over),
                             resume=True)
        trainer.setup()
        fresh = trainer.precompute_reference()
        trainer.close()
        return fresh

    out = tmp_path / "run"
    assert computed(out) is True
    assert computed(out) is False  # same base, dtype, max_length, loss type and tokens: reused
    other_model = build_tiny_model(tmp_path / "other-model", seed=1)  # same shapes and tokenizer, other weights
    for change in ({"model_name_or_path": other_model}, {"dtype": "bfloat16"}, {"max_length": 95},
                   {"loss_type": "ipo"}, {"train_file": tmp_path / "shifted.jsonl"}):
        if "train_file" in change:  # the same rows with one answer changed: other token ids
            rows = DATA.read_text().splitlines()
            rows[0] = rows[0].replace('"chosen": "', '"chosen": "Well, ', 1)
            change["train_file"].write_text("\n".join(rows) + "\n")
        assert computed(out, **change) is True, change
        assert computed(out) is True, f"back from {change}"


def test_rpo_alpha_adds_the_chosen_nll(tiny_llama, tmp_path):
    """At step 1 the policy is the reference (B = 0), so the DPO part is exactly ln 2 and the loss is
    ln 2 + alpha x the chosen tokens' NLL; that NLL is what the chosen log-probs say per token."""
    alpha = 0.5
    trainer = DPOTrainer(tiny_config(tiny_llama, tmp_path / "run", max_steps=1, save_steps=0, rpo_alpha=alpha,
                                     per_device_train_batch_size=4))
    trainer.setup()
    idx = trainer.micro_batches(0).local[0]
    loss, stats = trainer.pair_loss([trainer.pairs[i] for i in idx], idx, train=False)
    tokens = sum(len(trainer.pairs[i].chosen_ids) for i in idx)
    assert stats["nll_loss"] == pytest.approx(-stats["logps/chosen"] * len(idx) / tokens, rel=1e-5)
    assert loss.item() == pytest.approx(math.log(2) + alpha * stats["nll_loss"], abs=1e-5)
    with pytest.raises(ValueError, match="rpo_alpha"):
        tiny_config(tiny_llama, tmp_path / "bad", rpo_alpha=-1)
    trainer.close()


MPO = {"loss_type": "[sigmoid,bco_pair,sft]", "loss_weights": "[0.8,0.2,1.0]", "use_weighting": "true",
       "ld_alpha": 0.5, "precompute_ref_log_probs": "true"}


def test_weighted_losses_with_wpo_and_ld_dpo_train_and_resume_exactly(tiny_llama, tmp_path, capsys):
    """TRL's MPO list with WPO and LD-DPO trains end to end, and a run resumed from its step-2 checkpoint ends
    bit-identical to the uninterrupted one (no loss keeps state between steps; the reference cache is keyed)."""
    whole = tmp_path / "whole"
    a = train_dpo(tiny_config(tiny_llama, whole, max_steps=4, save_steps=2, **MPO))
    steps = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [s for s in steps if "loss" in s]
    assert [s["step"] for s in trained] == [1, 2, 3, 4] and all(math.isfinite(s["loss"]) for s in trained)
    assert {"rewards/chosen", "rewards/margins", "logps/rejected"} <= trained[0].keys()
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    (resumed / "checkpoints" / "LATEST").write_text("step-000002")
    capsys.readouterr()
    b = train_dpo(tiny_config(tiny_llama, resumed, max_steps=4, save_steps=2, **MPO), resume=True)
    said = capsys.readouterr()
    assert "resumed from" in said.out + said.err and "step-000002" in said.out + said.err
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    plain = adapter_tensors(train_dpo(tiny_config(tiny_llama, tmp_path / "plain", max_steps=4, save_steps=0)))
    assert any(not torch.equal(ta[k], plain[k]) for k in ta)  # the options changed the training


def test_ld_alpha_is_part_of_the_reference_cache_key(tiny_llama, tmp_path):
    def key(**over) -> str:
        trainer = DPOTrainer(tiny_config(tiny_llama, tmp_path / "run", precompute_ref_log_probs=True, **over),
                             resume=True)
        trainer.setup()
        value = trainer.reference_key()
        trainer.close()
        return value

    assert key() == key(use_weighting="true") != key(ld_alpha=0.5) != key(ld_alpha=0.25)
