"""KTO: the loss by hand, the rows and batches by hand, and end to end on the tiny model (the held-out loss
falls, only the adapter learns, resume is exact, bad rows are one line each before any model loads)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align_main
from align.data.issues import DataError
from align.data.unpaired import TokenizedExample, collate_unpaired, load_unpaired, tokenize_prompt_completion
from align.recipes.kto import KTOConfig, KTOTrainer, kto_metrics, train_kto
from align.recipes.kto_losses import kl_estimate, kto_loss
from align.train.config_parser import load_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "kto_tiny.yaml"
DATA = REPO / "tests" / "data" / "kto_tiny.jsonl"
PAIRS = REPO / "tests" / "data" / "prefs_tiny.jsonl"


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def tiny_config(model, out, **over) -> KTOConfig:
    sets = [f"model_name_or_path={model}", f"output_dir={out}", f"train_file={DATA}", "report_to=[none]"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(KTOConfig, TINY_CONFIG, sets)


# -- the loss by hand ------------------------------------------------------------------------------
# Three examples: one desirable (log-ratio r = 0.5), two undesirable (r = 0 and -1); β = 0.5, z = 0.2,
# desirable_weight 2, undesirable_weight 0.5.
POLICY = torch.tensor([-1.0, -2.0, -3.0])
REF = torch.tensor([-1.5, -2.0, -2.0])
LABELS = torch.tensor([True, False, False])


def test_kto_loss_by_hand():
    losses, r_c, r_r = kto_loss(POLICY, REF, LABELS, torch.tensor(0.2), 0.5, 2.0, 0.5, "kto")
    expected = [2 * (1 - sig(0.5 * (0.5 - 0.2))), 0.5 * (1 - sig(0.5 * (0.2 - 0.0))),
                0.5 * (1 - sig(0.5 * (0.2 + 1.0)))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)
    assert r_c.tolist() == pytest.approx([0.25]) and r_r.tolist() == pytest.approx([0.0, -0.5])


def test_apo_zero_unpaired_by_hand():
    losses, _, _ = kto_loss(POLICY, REF, LABELS, torch.tensor(0.2), 0.5, 1.0, 1.0, "apo_zero_unpaired")
    # no KL point: desirable 1 - σ(βr), undesirable σ(βr)
    assert losses.tolist() == pytest.approx([1 - sig(0.25), sig(0.0), sig(-0.5)], abs=1e-7)


def test_gradient_by_hand():
    policy = POLICY.clone().requires_grad_(True)
    losses, _, _ = kto_loss(policy, REF, LABELS, torch.tensor(0.2), 0.5, 2.0, 0.5, "kto")
    losses.nanmean().backward()
    # d/dπ of w(1 - σ(β(r - z))) / 3 is -wβσ'(x)/3; of w(1 - σ(β(z - r))) / 3 it is +wβσ'(x)/3
    ds = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    expected = [-2 * 0.5 * ds(0.15) / 3, 0.5 * 0.5 * ds(0.1) / 3, 0.5 * 0.5 * ds(0.6) / 3]
    assert policy.grad.tolist() == pytest.approx(expected, abs=1e-8)


def test_kl_point_is_the_clamped_mean_without_gradient():
    policy = torch.tensor([-1.0, -3.0], requires_grad=True)
    z = kl_estimate(policy, torch.tensor([-2.0, -2.5]))
    assert z.item() == pytest.approx(0.25) and not z.requires_grad  # (1 - 0.5) / 2
    assert kl_estimate(torch.tensor([-3.0]), torch.tensor([-2.0])).item() == 0.0  # -1 clamped
    # averaged over processes before the clamp, as TRL gathers it
    assert kl_estimate(policy, torch.tensor([-2.0, -2.5]), lambda t: t - 1.0).item() == 0.0


def test_metrics_are_per_example_means_over_micro_batches():
    # two micro-batches: rewards of desirable examples 1, 2 | 3; undesirable -1 | (none)
    a = {"kl": 0.1, "_n_chosen": 2.0, "_rewards_chosen": 3.0, "_logps_chosen": -4.0, "_n_rejected": 1.0,
         "_rewards_rejected": -1.0, "_logps_rejected": -9.0}
    b = {"kl": 0.3, "_n_chosen": 1.0, "_rewards_chosen": 3.0, "_logps_chosen": -2.0, "_n_rejected": 0.0,
         "_rewards_rejected": 0.0, "_logps_rejected": 0.0}
    mean = {k: (a[k] + b[k]) / 2 for k in a}  # what the gradient step reports
    out = kto_metrics(mean)
    assert out == pytest.approx({"kl": 0.2, "rewards/chosen": 2.0, "logps/chosen": -2.0, "rewards/rejected": -1.0,
                                 "logps/rejected": -9.0, "rewards/margins": 3.0})
    assert "rewards/rejected" not in kto_metrics(b) and "rewards/margins" not in kto_metrics(b)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(POLICY, REF, LABELS, torch.tensor(0.0), 0.1, loss_type="sigmoid")


# -- rows and batches by hand ------------------------------------------------------------------------
def test_collate_rotates_completions_for_the_kl_pairs_and_cuts_to_max_length():
    ex = [TokenizedExample([1, 2], [3, 4], True, "a"), TokenizedExample([5], [6], False, "b"),
          TokenizedExample([7, 8, 9], [10, 11, 12], True, "c")]
    b = collate_unpaired(ex, 0, 5)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 0], [5, 6, 0, 0, 0], [7, 8, 9, 10, 11]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    # prompt i with completion i-1: (x1, y3), (x2, y1), (x3, y2)
    assert b["KL_input_ids"].tolist() == [[1, 2, 10, 11, 12], [5, 3, 4, 0, 0], [7, 8, 9, 6, 0]]
    assert b["KL_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert b["label"].tolist() == [True, False, True]
    assert "KL_input_ids" not in collate_unpaired(ex, 0, 5, kl=False)


def test_rows_pairs_and_labels_are_read_as_trl_writes_them(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "q", "completion": "a", "label": true}\n'
                    '{"prompt": "q", "chosen": "good", "rejected": "bad"}\n'
                    '{"prompt": "q", "completion": "b", "label": 0}\n')
    rows = load_unpaired(str(path)).rows
    assert [(r.completion, r.label, r.field) for r in rows] == [("a", True, "completion"), ("good", True, "chosen"),
                                                               ("bad", False, "rejected"), ("b", False, "completion")]
    assert rows[1].where == f"{path}:2"


def test_every_bad_row_is_named_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "completion": "a", "label": true}\n'
                    '{"prompt": "q", "completion": "a", "label": "yes please"}\n'
                    '{"prompt": "q", "completion": ""}\n'
                    '{"prompt": [{"role": "user", "content": "q"}], "completion": "a", "label": false}\n')
    with pytest.raises(DataError) as e:
        load_unpaired(str(path))
    text = str(e.value)
    assert f"{path}:2: field 'label': expected true (desirable) or false (undesirable), got 'yes please'" in text
    assert f"{path}:3: field 'label': missing" in text
    assert f"{path}:4: field 'prompt': expected the same format as completion (standard), got conversational" in text


def test_string_rows_end_with_eos_and_the_template_is_optional(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt_ids, completion_ids = tokenize_prompt_completion("What is 1+1?", "2", tok)
    assert prompt_ids == tok(text="What is 1+1?")["input_ids"] and completion_ids[-1] == tok.eos_token_id
    templated = tokenize_prompt_completion("What is 1+1?", "2", tok, chat_template=True)
    messages = [{"role": "user", "content": "What is 1+1?"}]
    assert templated[0] == tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


# -- end to end --------------------------------------------------------------------------------------
def test_cli_trains_and_the_held_out_loss_falls(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    # the policy starts equal to the reference (LoRA B = 0): every KTO loss is 1 - σ(0) = 0.5
    trainer = KTOTrainer(tiny_config(tiny_llama, tmp_path / "before"))
    trainer.setup()
    before = trainer.evaluate()
    trainer.close()
    assert before["eval/loss"] == pytest.approx(0.5, abs=1e-6) and before["eval/kl"] == 0.0
    code = align_main(["kto", "--config", str(TINY_CONFIG), "--model_name_or_path", str(tiny_llama),
                       "--output_dir", str(out), "--set", f"train_file={DATA}", "--report_to", "none"])
    assert code == 0
    assert f"adapter saved to {out / 'adapter'}" in capsys.readouterr().out
    final = json.loads((out / "final_metrics.json").read_text())
    print(f"held-out KTO loss {before['eval/loss']:.4f} -> {final['eval/loss']:.4f}")
    assert final["eval/loss"] < before["eval/loss"] - 0.01
    assert final["eval/rewards/margins"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    # TRL's names, so dashboards built for TRL read these runs
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "grad_norm", "learning_rate"} <= {k for r in steps for k in r}
    assert not any(k.startswith("_") for r in rows for k in r)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not list((out / "adapter").glob("*.bin"))


class Interrupted(Exception):
    pass


class StopsAfterCheckpoint(KTOTrainer):
    """Dies right after writing the checkpoint of step `stop` (as a kill there would)."""

    stop = 3

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == self.stop:
            raise Interrupted(path)
        return path


def test_resume_equals_an_uninterrupted_run(tiny_llama, tmp_path):
    over = {"max_steps": 6, "save_steps": 1}
    straight = train_kto(tiny_config(tiny_llama, tmp_path / "straight", **over))
    killed = tmp_path / "killed"
    with pytest.raises(Interrupted):
        StopsAfterCheckpoint(tiny_config(tiny_llama, killed, **over)).train()
    resumed = train_kto(tiny_config(tiny_llama, killed, **over), resume=True)
    a, b = load_file(str(straight / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == list(range(1, 7))


def test_python_api_takes_rows_and_pairs(tiny_llama, tmp_path):
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()][:6]
    config = dataclasses.replace(tiny_config(tiny_llama, tmp_path / "run", max_steps=2, save_steps=0,
                                             eval_fraction=0.0), train_file="")
    trainer = KTOTrainer(config, train_dataset=pairs, eval_dataset=pairs[:2])
    trainer.train()
    trainer.close()
    assert trainer.summary["train_examples"] == 12 and trainer.summary["desirable"] == 6
    assert "eval/rewards/margins" in trainer.summary


def test_bad_data_is_one_line_before_any_model_loads(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "completion": "a", "label": true}\n{"prompt": "q", "completion": "b", '
                   '"label": "no idea"}\n')
    # the model does not exist: the data error comes first
    code = align_main(["kto", "--config", str(TINY_CONFIG), "--set", f"model_name_or_path={tmp_path / 'no-model'}",
                       "--set", f"output_dir={tmp_path / 'run'}", "--set", f"train_file={bad}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: {bad}:2: field 'label': expected true (desirable) or false (undesirable), " \
                          "got 'no idea'"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("over,field", [({"loss_type": "sigmoid"}, "loss_type"), ({"beta": 0}, "beta"),
                                        ({"undesirable_weight": 0}, "undesirable_weight"),
                                        ({"per_device_train_batch_size": 1}, "per_device_train_batch_size"),
                                        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs")])
def test_bad_settings_name_the_field(over, field, tmp_path):
    from align.train.config_parser import ConfigError

    with pytest.raises((ValueError, ConfigError), match=field):
        tiny_config("x", tmp_path, **over)


def test_data_check_detects_kto_rows(tiny_llama, capsys):
    assert align_main(["data", "check", str(DATA), "--model_name_or_path", str(tiny_llama)]) == 0
    captured = capsys.readouterr()
    assert "checked as kto rows" in captured.err and "28 valid rows, OK" in captured.out


@pytest.mark.slow
def test_two_processes_equal_one_without_kl_and_share_the_kl_point(tiny_llama, tmp_path):
    """apo_zero_unpaired (no KL point): 2 processes at accumulation 1 equal 1 process at 2, as DPO does. kto:
    the KL point is averaged over the processes (TRL gathers it), so both run the same update; the run
    finishes, the adapter moved and the main process alone wrote."""
    from test_distributed import align_run, common, compare_runs, files, metrics

    steps = 3
    sets = ["per_device_train_batch_size=2", f"max_steps={steps}", "save_steps=1", "learning_rate=1e-2"]
    apo = [*sets, "loss_type=apo_zero_unpaired"]
    align_run("kto", "kto_tiny.yaml", common(tiny_llama, tmp_path / "one", *apo, "gradient_accumulation_steps=2",
                                             data=DATA), 1)
    align_run("kto", "kto_tiny.yaml", common(tiny_llama, tmp_path / "two", *apo, "gradient_accumulation_steps=1",
                                             data=DATA), 2)
    compare_runs(tmp_path / "one", tmp_path / "two", "adapter/adapter_model.safetensors", steps)
    moved = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in moved.items() if "lora_B" in k) > 1e-3
    align_run("kto", "kto_tiny.yaml", common(tiny_llama, tmp_path / "kl", *sets, data=DATA), 2)
    assert files(tmp_path / "kl") == files(tmp_path / "two")
    logged = metrics(tmp_path / "kl")
    assert [r["step"] for r in logged] == list(range(1, steps + 1)) and logged[-1]["kl"] >= 0


@pytest.mark.slow
def test_fsdp_equals_one_process_without_kl_and_runs_with_it(tiny_llama, tmp_path):
    """The base sharded over 2 processes (configs/accelerate/fsdp.yaml): apo_zero_unpaired equals 1 process at
    the same global batch, evaluation (on every process under FSDP) included; kto runs with its KL point."""
    from test_distributed import REPO, align_run, common, compare_runs, metrics

    fsdp = REPO / "configs" / "accelerate" / "fsdp.yaml"
    steps = 3
    sets = ["per_device_train_batch_size=2", f"max_steps={steps}", "save_steps=1", "learning_rate=1e-2",
            "eval_fraction=0.3"]  # 20 training examples: whole steps of 4 on 2 processes
    apo = [*sets, "loss_type=apo_zero_unpaired"]
    one, two = tmp_path / "one", tmp_path / "two"
    align_run("kto", "kto_tiny.yaml", common(tiny_llama, one, *apo, "gradient_accumulation_steps=2", data=DATA), 1)
    align_run("kto", "kto_tiny.yaml", common(tiny_llama, two, *apo, data=DATA), 2, launch=fsdp)
    compare_runs(one, two, "adapter/adapter_model.safetensors", steps)
    assert metrics(two)[-1]["eval/loss"] == pytest.approx(metrics(one)[-1]["eval/loss"], abs=1e-5)
    align_run("kto", "kto_tiny.yaml", common(tiny_llama, tmp_path / "kl", *sets, data=DATA), 2, launch=fsdp)
    assert "eval/kl" in metrics(tmp_path / "kl")[-1]
