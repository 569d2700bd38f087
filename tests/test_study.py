"""`align study NAME` end to end on the tiny model: each study writes report.md (the rule before the numbers),
PNG plots and result.json; the capacity set's bits are exact; the calibration scales steps with the budget.

The studies run with the hidden --max_steps cap so each ends in a minute or two; the steps they choose are
still printed from the calibration (`plan: ... steps per run: N`), which is what the budget test reads.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from align.cli import main
from align.study.data import capacity_bits, capacity_rows
from align.study.plan import Cost, Plan, Run, choose_units
from align.study.verdict import rule_text

PNG = b"\x89PNG\r\n\x1a\n"


def study(name: str, model, out, *extra: str) -> int:
    return main(["study", name, "--model", str(model), "--output_dir", str(out), "--seeds", "0", "1", *extra])


def check_outputs(name: str, out, steps: int) -> dict:
    report = (out / "report.md").read_text()
    rule = rule_text(name)
    assert rule in report
    assert report.index("## Rule") < report.index(rule) < report.index("## Results") < report.index("## Verdict")
    result = json.loads((out / "result.json").read_text())
    assert result["study"] == name and result["verdict"] in ("CONFIRM", "REFUTE", "INCONCLUSIVE")
    assert result["seeds"] == [0, 1]
    assert isinstance(result["noise"], float) and result["noise"] >= 0  # two seeds: a spread exists
    assert result["figures"] and result["reason"]
    assert result["plan"]["steps_per_run"] == steps
    assert f"## Verdict: {result['verdict']}" in report
    assert result["plots"]
    for png in result["plots"]:
        assert (out / png).read_bytes()[:8] == PNG and f"({png})" in report
    assert not list(out.rglob("*.safetensors")), "weights are deleted once their figures are read"
    return result


# -- pure parts ---------------------------------------------------------------------------------------
def test_capacity_bits_by_hand():
    rows = capacity_rows(3, 2, seed=0)
    assert len({r["prompt"] for r in rows}) == 3
    assert all(re.fullmatch(r"key: [a-z]{6} value:", r["prompt"]) for r in rows)
    assert all(re.fullmatch(r" \d\d", r["completion"]) for r in rows)
    # 3 keys x 2 digits, each one of 10 equally likely: 6 * log2(10) = 6 * 3.321928094887362 bits.
    assert capacity_bits(3, 2) == pytest.approx(19.931568569324174, abs=1e-12)
    assert capacity_bits(256, 6) == pytest.approx(256 * 6 * math.log2(10))


def test_choose_units_by_hand():
    costs = {"lora": Cost(step_s=1.0, overhead_s=10.0), "full": Cost(step_s=3.0, overhead_s=20.0)}
    runs = [Run("a", "lora"), Run("b", "lora"), Run("c", "full", steps_per_unit=2)]
    # left = 0.85 * (300 - 40) = 221; overheads 40; a unit costs 1 + 1 + 2 * 3 = 8 s -> floor(181 / 8) = 22.
    assert choose_units(Plan("x", 300, 40, costs, runs)).units == 22
    # Twice the budget: 0.85 * 560 = 476 -> floor(436 / 8) = 54.
    assert choose_units(Plan("x", 600, 40, costs, runs)).units == 54
    tight = choose_units(Plan("x", 60, 40, costs, runs))
    assert tight.units == 2 and "warning" in tight.lines()[-1]
    assert choose_units(Plan("x", 600, 40, costs, runs), max_units=5).units == 5


def test_bad_command_lines_are_one_line_before_any_model(capsys, tmp_path):
    assert main(["study", "layers", "--seeds", "0", "--output_dir", str(tmp_path)]) == 2
    assert "--seeds: expected at least 2" in capsys.readouterr().err
    assert main(["study", "layers", "--model", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path)]) == 2
    assert "--model:" in capsys.readouterr().err


# -- the calibration ----------------------------------------------------------------------------------
def planned_steps(capsys) -> int:
    out = capsys.readouterr().out
    return int(re.search(r"plan: \d+ runs, steps per run: (\d+)", out).group(1))


def test_calibration_scales_steps_with_the_budget(tiny_llama, tmp_path, capsys):
    assert study("layers", tiny_llama, tmp_path / "small", "--minutes", "2", "--plan_only") == 0
    small = planned_steps(capsys)
    assert study("layers", tiny_llama, tmp_path / "large", "--minutes", "60", "--plan_only") == 0
    large = planned_steps(capsys)
    print(f"steps per run: {small} for 2 min, {large} for 60 min")
    assert large > 5 * small
    assert not (tmp_path / "large" / "result.json").exists()  # --plan_only stops after the plan


# -- each study ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, steps", [("layers", 2), ("lr-ratio", 1), ("batch", 1), ("capacity", 2)])
def test_study_writes_report_plots_and_result(name, steps, tiny_llama, tmp_path, capsys):
    out = tmp_path / name
    assert study(name, tiny_llama, out, "--minutes", "0.5", "--max_steps", str(steps)) == 0
    result = check_outputs(name, out, steps)
    printed = capsys.readouterr().out
    assert "[study] calibration:" in printed and "seeds [0, 1]" in printed.lower()
    if name == "layers":
        params = result["figures"]["params"]
        assert max(params.values()) / min(params.values()) < 1.10  # matched on parameters
    if name == "capacity":
        assert result["figures"]["data_bits"] == pytest.approx(capacity_bits(256, 6))
        assert all(b >= 0 for b in result["figures"]["absorbed_bits"].values())
    if name == "batch":
        steps_run = {k: r["step"] for k, r in result["runs"].items() if k.endswith("seed=0")}
        assert steps_run == {f"{m}/batch={b}/seed=0": 16 // b for m in ("lora", "full") for b in (1, 4, 16)}


def test_rl_rank_lora_conditions(tiny_llama, tmp_path):
    from align.study.rl_rank import condition
    from align.study.runs import Context

    ctx = Context(str(tiny_llama), tmp_path, [0, 1])
    for name in ("rank 1", "rank 8"):
        figures = condition(ctx, name, 2)(f"{name}/lr=0.0001/seed=0", 0, 1e-4)
        assert 0.0 <= figures["eval/reward"] <= 1.0 and 0.0 <= figures["eval/reward_before"] <= 1.0
        assert figures["trainable_params"] == (1 if name == "rank 1" else 8) * 2 * 1024  # tiny: 2,048 per rank
        assert [r["step"] for r in figures["curve"] if "eval/reward" in r][-1] == 2


def test_rl_rank_study(tiny_llama, tmp_path):
    out = tmp_path / "rl-rank"
    assert study("rl-rank", tiny_llama, out, "--minutes", "0.5", "--max_steps", "2") == 0
    check_outputs("rl-rank", out, 2)
