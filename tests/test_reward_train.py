"""Reward-model training on the tiny model: it learns, leaves the base untouched, resumes exactly,
reads margins, and reports bad rows and bad configs clearly."""

import json
from pathlib import Path

import pytest
import torch

from align.data.preference import DataError
from align.train.config_parser import load_config
from reward.model import RewardModel
from reward.train import RewardConfig, RewardTrainer, length_baseline_accuracy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "reward_tiny.yaml"


def _config(tiny_llama, out, *overrides):
    data = ROOT / "tests" / "data" / "prefs_tiny.jsonl"
    return load_config(RewardConfig, CONFIG, [f"model_name_or_path={tiny_llama}", f"output_dir={out}",
                                              f"train_file={data}", *overrides])


def test_training_learns_and_leaves_the_base_untouched(tiny_llama, tmp_path, capsys):
    trainer = RewardTrainer(_config(tiny_llama, tmp_path / "run"))
    trainer.setup()
    base_before = {n: p.detach().clone() for n, p in trainer.base.base_parameters().items()}
    start = trainer.evaluate()
    path = trainer.train()
    end = trainer.summary
    assert all(torch.equal(p, base_before[n]) for n, p in trainer.base.base_parameters().items())
    assert end["eval/loss"] < start["eval/loss"] - 0.1
    assert end["eval/accuracy"] == 1.0
    assert end["eval/pairs"] == 6  # 24 rows, 25% held out
    # The run folder holds what a user needs: the reward model, metrics, calibration.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))  # 18 pairs / 6 per step * 3 epochs
    assert {"accuracy", "margin", "learning_rate", "grad_norm", "epoch"} <= set(rows[0])  # TRL's names
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["calibration"]
    from align.core.base import SharedBase

    # The saved reward model scores exactly like the one that was trained.
    fresh = RewardModel.attach(SharedBase.load(str(tiny_llama)), path)
    # chat_template: the recipe's default (string rows plain, as TRL reads them), kept in reward_meta.json.
    assert fresh.max_length == 96 and fresh.chat_template is False
    from align.data.preference import collate_pairs

    batch = collate_pairs(trainer.eval_pairs, trainer.base.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(fresh.score_ids(batch["input_ids"], batch["attention_mask"]),
                           trainer.rm.score_ids(batch["input_ids"], batch["attention_mask"]))

    # `align reward score` prints the same scores as the Python API, one JSON line per completion.
    from align.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 2+3?", "completion": "5"}) + "\n"
                    + json.dumps({"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}) + "\n")
    assert main(["reward", "score", str(rows), "--model_name_or_path", str(path)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    expected = fresh.score(["What is 2+3?"] * 3, ["5", "5", "6"]).tolist()
    assert [p["where"] for p in printed] == [f"{rows}:1:completion", f"{rows}:2:chosen", f"{rows}:2:rejected"]
    assert [p["reward"] for p in printed] == expected


def test_resume_with_more_steps_equals_uninterrupted(tiny_llama, tmp_path):
    # A finished run continued with a larger max_steps (constant lr, so the schedule does not depend on it).
    straight = RewardTrainer(_config(tiny_llama, tmp_path / "a", "max_steps=4", "save_steps=0"))
    straight.train()

    RewardTrainer(_config(tiny_llama, tmp_path / "b", "max_steps=2", "save_steps=0")).train()
    second = RewardTrainer(_config(tiny_llama, tmp_path / "b", "max_steps=4", "save_steps=0"), resume=True)
    second.setup()
    assert second.step == 2
    second.train()

    assert torch.equal(second.rm.head.weight, straight.rm.head.weight)
    for (n, p), q in zip(second.base.adapter_parameters("reward").items(),
                         straight.base.adapter_parameters("reward").values(), strict=True):
        assert torch.equal(p, q), n
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]  # each step once: the final eval row of the first attempt is dropped


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "What is 1+2?", "chosen": "3", "rejected": "4"}


def test_margins_follow_their_rows(tiny_llama, tmp_path):
    data = _write(tmp_path / "m.jsonl", [{**GOOD, "margin": 1.5}, {**GOOD, "chosen": "three"},
                                         {**GOOD, "chosen": "3.0", "margin": 0.25}])
    trainer = RewardTrainer(_config(tiny_llama, tmp_path / "run", f"train_file={data}", "eval_fraction=0"))
    trainer.setup()
    assert trainer.margin_of(trainer.pairs).tolist() == [1.5, 0.0, 0.25]
    off = RewardTrainer(_config(tiny_llama, tmp_path / "run2", f"train_file={data}", "eval_fraction=0",
                                "use_margins=false"))
    off.setup()
    assert off.margin_of(off.pairs) is None


def test_bad_rows_are_named(tiny_llama, tmp_path):
    data = _write(tmp_path / "bad.jsonl", [GOOD, {"prompt": "What is 1+2?", "chosen": "3"}, "{not json",
                                           {**GOOD, "rejected": "3"}])
    trainer = RewardTrainer(_config(tiny_llama, tmp_path / "run", f"train_file={data}"))
    with pytest.raises(DataError) as e:
        trainer.setup()
    msg = str(e.value)
    assert f"{data}:2: field 'rejected': missing" in msg
    assert f"{data}:3: not valid JSON" in msg
    assert f"{data}:4: field 'rejected': identical to chosen" in msg

    margins = _write(tmp_path / "margin.jsonl", [GOOD, {**GOOD, "margin": "big"}])
    trainer = RewardTrainer(_config(tiny_llama, tmp_path / "run2", f"train_file={margins}"))
    with pytest.raises(DataError, match=rf"{margins}:2: field 'margin': expected a finite number.*'big'"):
        trainer.setup()


def test_bad_config_is_named(tmp_path):
    from align.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train_file: x.jsonl\nlearning_rat: 1.0e-4\n")
    assert main(["reward", "--config", str(bad)]) == 2
    with pytest.raises(Exception, match=r"bad.yaml:2: learning_rat: unknown key"):
        load_config(RewardConfig, bad)
    with pytest.raises(Exception, match="train_file and demo_pairs: choose one"):
        RewardConfig(train_file="x.jsonl", demo_pairs=10)


def test_length_baseline_by_hand():
    from align.data.preference import TokenizedPair

    pairs = [TokenizedPair([1], [2, 3], [4], "a"), TokenizedPair([1], [2], [4, 5], "b"),
             TokenizedPair([1], [2], [4], "c")]
    # longer chosen wins, longer rejected loses, a tie counts half: (1 + 0 + 0.5) / 3
    assert length_baseline_accuracy(pairs) == pytest.approx(0.5, abs=1e-9)


def test_demo_pairs_are_length_balanced():
    from align.tasks.arithmetic import score
    from reward.pairs import arithmetic_pairs

    rows = arithmetic_pairs(300, seed=0)
    assert all(score(r["chosen"], r["answer"]) > score(r["rejected"], r["answer"]) for r in rows)
    assert all(len(r["chosen"]) == len(r["rejected"]) for r in rows)
    assert {r["chosen"].count("=") for r in rows} == {0, 1}  # both forms appear
    bare = [sum("=" not in r["chosen"] for r in arithmetic_pairs(1000, seed=1, bare_share=s)) for s in (0.1, 0.5)]
    assert 60 < bare[0] < 140 and 440 < bare[1] < 560  # the share of bare-number rows follows bare_share
    with pytest.raises(ValueError, match="bare_share"):
        arithmetic_pairs(10, seed=0, bare_share=1.5)


def test_pairs_from_samples_rank_by_task_reward():
    from reward.pairs import pairs_from_samples

    rows = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "What is 1+1?", "answer": "2"},
            {"prompt": "What is 4+4?", "answer": "8"}]
    texts = [["5", "It is 5", "7", " 5 ", "", "2 + 3 = 6"],   # scores 1, 0.5, 0, (dup of "5"), (empty), 0
             ["3", "4"],                                      # all wrong: no pair
             ["8", "9", "10", "11", "12"]]                    # 1 vs four wrong: capped at 3
    pairs = pairs_from_samples(rows, texts, max_per_prompt=3)
    got = [(p["prompt"][8:11], p["chosen"], p["rejected"]) for p in pairs]
    # Largest score gap first (1 vs 0), then 0.5 vs 0; ties keep the sampled order.
    assert got == [("2+3", "5", "7"), ("2+3", "5", "2 + 3 = 6"), ("2+3", "5", "It is 5"),
                   ("4+4", "8", "9"), ("4+4", "8", "10"), ("4+4", "8", "11")]
    assert {p["answer"] for p in pairs} == {"5", "8"}


def test_sampled_pairs_name_the_shortfall(tiny_llama, capsys):
    # A random tiny model never writes a right sum: no pairs, and the error says what to do.
    from align.core.base import SharedBase
    from reward.pairs import sampled_arithmetic_pairs

    base = SharedBase.load(str(tiny_llama))
    with pytest.raises(RuntimeError, match="only 0 of 8 demo pairs after 1 rounds.*demo_source: synthetic"):
        sampled_arithmetic_pairs(base, str(tiny_llama), 8, seed=0, engine="hf", max_rounds=1, max_new_tokens=4)
    # The minutes of sampling show as a bar of pairs made, one update per round.
    err = capsys.readouterr().err
    assert "demo pairs (sample, score)" in err and "0/8" in err and "round=1" in err


def test_resume_reuses_sampled_demo_pairs(tiny_llama, tmp_path):
    # Sampled pairs cost minutes: a restart with the same settings reads the ones already written.
    # The tiny model cannot make pairs itself, so setup succeeds only by reusing the files.
    from reward.pairs import arithmetic_pairs, write_jsonl

    config = load_config(RewardConfig, CONFIG, [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path}",
                                                "train_file=''", "demo_pairs=16", "demo_eval_pairs=8",
                                                "demo_source=samples"])
    trainer = RewardTrainer(config)
    data = tmp_path / "data"
    write_jsonl(arithmetic_pairs(16, seed=0), data / "train.jsonl")
    write_jsonl(arithmetic_pairs(8, seed=1), data / "eval.jsonl")
    (data / "demo.json").write_text(trainer.demo_stamp(str(tiny_llama)))
    written = (data / "train.jsonl").read_text(), (data / "eval.jsonl").read_text()
    trainer.setup()
    assert len(trainer.pairs) == 16 and len(trainer.eval_pairs) == 8
    assert ((data / "train.jsonl").read_text(), (data / "eval.jsonl").read_text()) == written  # not re-sampled
    # Other settings must not reuse these pairs: their stamp differs in what changed.
    for change in ("demo_pairs=24", "demo_eval_pairs=4", "seed=1"):
        other = load_config(RewardConfig, CONFIG, [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path}",
                                                   "train_file=''",
                                                   "demo_pairs=16", "demo_eval_pairs=8", "demo_source=samples",
                                                   change])
        assert RewardTrainer(other).demo_stamp(str(tiny_llama)) != trainer.demo_stamp(str(tiny_llama)), change
