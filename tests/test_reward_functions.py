"""Programmatic rewards called the TRL way: built-ins by hand, user functions by dotted path or as
callables, dataset columns as keywords, None per row, and row-named one-line errors."""

import math
import sys
import textwrap

import pytest
import torch

from reward.functions import (
    RewardError,
    RewardFunctions,
    call_reward_func,
    load_reward_func,
    reward_func_name,
    rows_without_reward,
)

USER_MODULE = textwrap.dedent('''
    import math

    def exclaims(completions, **kwargs):
        return [float(c.count("!")) for c in completions]

    def correct(completions, solution, **kw):
        return [None if s is None else float(c.strip() == s) for c, s in zip(completions, solution)]

    def seen(prompts, completions, completion_ids, **kwargs):
        # what TRL passes, echoed back: completion kind, id count, column names
        seen.calls.append((type(completions[0]).__name__, [len(i) for i in completion_ids], sorted(kwargs)))
        return [1.0] * len(completions)
    seen.calls = []

    def fails_on_x(completions, **kwargs):
        out = []
        for c in completions:
            if "x" in c:
                raise ValueError("cannot score an x")
            out.append(1.0)
        return out

    def nan_on_x(completions, **kwargs):
        return [math.nan if "x" in c else 1.0 for c in completions]

    def too_few(completions, **kwargs):
        return [1.0]

    def yes_no(completions, **kwargs):
        return [True for c in completions]

    class Scorers:
        @staticmethod
        def ones(completions, **kwargs):
            return [1.0] * len(completions)

    NOT_A_FUNCTION = 3
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    for name in ("my_lib", "my_lib.rewards"):  # each test imports its own fresh copy
        monkeypatch.delitem(sys.modules, name, raising=False)
    pkg = tmp_path / "my_lib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_lib.rewards"


PROMPTS = ["What is 2+3? Reply with the number only."] * 4
COMPLETIONS = ["5", "2 + 3 = 5", "6", "The answer is five"]
IDS = [[1], [2, 3], [4], [5, 6, 7]]
ANSWERS = ["5"] * 4


def call(spec, completions=COMPLETIONS, prompts=PROMPTS, ids=IDS, **columns):
    return call_reward_func(load_reward_func(spec), prompts, completions, ids, columns)


def test_arithmetic_matches_the_task_score():
    # "5" bare and correct -> 1; "2 + 3 = 5" last integer correct -> 0.5; "6" -> 0; no integer -> 0
    assert call("arithmetic", answer=ANSWERS) == [1.0, 0.5, 0.0, 0.0]


def test_arithmetic_without_answer():
    with pytest.raises(RewardError, match=r"reward arithmetic: needs column\(s\) \['answer'\], the data has none"):
        call("arithmetic")
    # a row without an answer has no opinion: None -> NaN
    out = call("arithmetic", COMPLETIONS[:3], PROMPTS[:3], IDS[:3], answer=["5", "5", None])
    assert out[:2] == [1.0, 0.5] and math.isnan(out[2])


def test_format_and_length_penalty_by_hand():
    assert call("format", [" 5.", "2 + 3 = 5", "-12", "five"]) == [1.0, 0.0, 1.0, 0.0]
    # default: -0.01 per character: lengths 1, 9, 1, 18
    assert call("length_penalty") == pytest.approx([-0.01, -0.09, -0.01, -0.18])
    # limit 8, 0.5 per character beyond: 0, -(9-8)*0.5, 0, -(18-8)*0.5
    assert call("length_penalty(limit=8, per_char=0.5)") == pytest.approx([0.0, -0.5, 0.0, -5.0])
    assert reward_func_name(load_reward_func("length_penalty(limit=8)")) == "length_penalty"  # TRL's name


def test_builtins_read_conversational_completions():
    chat = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    assert call("arithmetic", chat, prompts, answer=ANSWERS) == [1.0, 0.5, 0.0, 0.0]
    assert call("format", chat, prompts) == [1.0, 0.0, 1.0, 0.0]
    assert call("length_penalty", chat, prompts) == pytest.approx([-0.01, -0.09, -0.01, -0.18])


def test_functions_get_trl_arguments_and_columns(user_module):
    import my_lib.rewards as m

    # the `solution` column reaches `correct` by name; None rows come back NaN
    out = call(f"{user_module}.correct", ["5", "6", "5", "7"], solution=["5", "5", None, "7"])
    assert out[:2] == [1.0, 0.0] and math.isnan(out[2]) and out[3] == 1.0
    # string prompts: string completions; conversational prompts: message lists, as TRL gives them
    call(f"{user_module}.seen", answer=ANSWERS, solution=ANSWERS, prompt=PROMPTS)
    chat = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    call(f"{user_module}.seen", chat, [[{"role": "user", "content": p}] for p in PROMPTS], answer=ANSWERS)
    # "prompt" is never a column (TRL drops it too); ids arrive per row
    assert m.seen.calls == [("str", [1, 2, 1, 3], ["answer", "solution"]), ("list", [1, 2, 1, 3], ["answer"])]


def test_specs_dotted_old_form_and_callables(user_module):
    assert call(f"{user_module}.exclaims", ["a!", "b", "!!", ""]) == [1.0, 0.0, 2.0, 0.0]
    assert call("my_lib.rewards:exclaims", ["a!", "b", "!!", ""]) == [1.0, 0.0, 2.0, 0.0]  # the older form
    assert call(f"{user_module}.Scorers.ones") == [1.0] * 4  # a module prefix, then attributes
    fn = lambda completions, **kw: [2.0] * len(completions)  # noqa: E731
    assert load_reward_func(fn) is fn and call(fn) == [2.0] * 4


def test_reward_functions_score_per_function(user_module):
    rf = RewardFunctions(["arithmetic", "format", f"{user_module}.exclaims", "format"], [1.0, 0.5, -2.0, 0.0])
    assert rf.names == ["arithmetic", "format", "exclaims", "format#1"]
    completions = ["5", "2 + 3 = 5!", "6!!", "x"]
    per_func = rf.score(PROMPTS, completions, IDS, {"answer": ANSWERS})
    assert per_func.shape == (4, 4) and rf.weights.tolist() == [1.0, 0.5, -2.0, 0.0]
    assert per_func[:, :3].T.tolist() == [[1.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.0]]
    # 1 + 0.5*1 - 0 = 1.5;  0.5 + 0 - 2*1 = -1.5;  0 + 0.5*0 - 2*2 = -4;  0
    assert (per_func * rf.weights).nansum(1).tolist() == pytest.approx([1.5, -1.5, -4.0, 0.0])


def test_rows_no_function_scored(user_module):
    rf = RewardFunctions(["arithmetic", f"{user_module}.correct"])
    assert rf.weights.tolist() == [1.0, 1.0]
    per_func = rf.score(PROMPTS[:3], ["5", "5", "5"], IDS[:3], {"answer": ["5", None, None],
                                                               "solution": [None, "5", None]})
    assert rows_without_reward(per_func) == [2]
    assert (per_func * rf.weights).nansum(1).tolist() == [1.0, 1.0, 0.0]  # TRL's rule: None counts 0


def test_weights_must_match():
    with pytest.raises(RewardError, match=r"reward_weights: 1 weights for 2 reward functions"):
        RewardFunctions(["format", "arithmetic"], [1.0])
    with pytest.raises(RewardError, match=r"reward_weights: item 0 is nan"):
        RewardFunctions(["format"], [float("nan")])
    with pytest.raises(RewardError, match="at least one"):
        RewardFunctions([])


def test_user_function_errors_name_the_row(user_module):
    completions = ["ok", "fine", "has x", "ok"]
    with pytest.raises(RewardError, match=r"fails_on_x failed on row 2 .*'has x'.*ValueError: cannot score an x"):
        call(f"{user_module}.fails_on_x", completions)
    with pytest.raises(RewardError, match=r"nan_on_x returned nan on row 2 .*expected a finite number"):
        call(f"{user_module}.nan_on_x", completions)
    with pytest.raises(RewardError, match=r"reward too_few: returned 1 values for 4 rows"):
        call(f"{user_module}.too_few", completions)
    with pytest.raises(RewardError, match=r"reward yes_no returned True \(bool\) on row 0 .*expected a float"):
        call(f"{user_module}.yes_no", completions)
    # Among several, the failing one and its row are still named, with the row's place when known.
    rf = RewardFunctions(["format", f"{user_module}.fails_on_x"])
    with pytest.raises(RewardError, match=r"fails_on_x failed on row 2 at data.jsonl:3 ") as e:
        rf.score(PROMPTS, completions, IDS, {}, places=[f"data.jsonl:{i + 1}" for i in range(4)])
    assert "\n" not in str(e.value)


def test_bad_specs_are_clear(user_module):
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        load_reward_func("no_such_module_xyz.score")
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        load_reward_func("no_such_module_xyz:score")
    with pytest.raises(RewardError, match=f"'{user_module}' has no attribute 'missing'"):
        load_reward_func(f"{user_module}.missing")
    with pytest.raises(RewardError, match="is a int, expected a function"):
        load_reward_func(f"{user_module}.NOT_A_FUNCTION")
    with pytest.raises(RewardError, match=r"expected 'module.function' or 'module:function'"):
        load_reward_func(":score")
    with pytest.raises(RewardError, match=r"unknown name; expected one of \['arithmetic', 'format', 'length_penalty'\]"):
        load_reward_func("accuracy")
    with pytest.raises(RewardError, match=r"unknown argument\(s\) \['limt'\]"):
        load_reward_func("length_penalty(limt=3)")
    with pytest.raises(RewardError, match="expected name"):
        load_reward_func("length_penalty(3)")


def test_length_mismatch_is_refused():
    with pytest.raises(RewardError, match=r"4 completions but \{'prompts': 2\}"):
        call("format", prompts=PROMPTS[:2])
    with pytest.raises(RewardError, match=r"column 'answer'"):
        call("arithmetic", answer=ANSWERS[:3])


def test_scores_match_trl_own_call(user_module):
    """TRL's GRPOTrainer._calculate_rewards, run on our functions, gives the same per-function values."""
    from types import SimpleNamespace

    from trl import GRPOTrainer

    rf = RewardFunctions(["arithmetic", f"{user_module}.correct"])
    inputs = [{"prompt": p, "answer": a, "solution": s} for p, a, s in zip(PROMPTS, ANSWERS, ["5", None, "6", "x"])]
    fake = SimpleNamespace(accelerator=SimpleNamespace(device="cpu", is_main_process=True), reward_funcs=rf.funcs,
                           reward_processing_classes=[None, None], reward_func_names=rf.names,
                           state=SimpleNamespace(global_step=0), args=SimpleNamespace(report_to=[]),
                           _log_completion_extra=None, _log_metric=None, environments=None)
    try:
        trl = GRPOTrainer._calculate_rewards(fake, inputs, PROMPTS, COMPLETIONS, IDS)
    except AttributeError as e:  # TRL reads more of its trainer than this stand-in has: say which
        pytest.fail(f"TRL's _calculate_rewards needs {e}")
    ours = rf.score(PROMPTS, COMPLETIONS, IDS, {"answer": ANSWERS, "solution": ["5", None, "6", "x"]})
    assert torch.equal(torch.isnan(trl), torch.isnan(ours))
    assert torch.nan_to_num(trl).tolist() == torch.nan_to_num(ours).tolist()


def test_training_prompts_never_hold_a_held_out_prompt():
    from align.tasks.arithmetic import make_prompts

    held_out = {r["prompt"] for r in make_prompts(100, seed=2)}
    plain = make_prompts(300, seed=1)
    assert any(r["prompt"] in held_out for r in plain)  # the draws do collide: the exclusion matters
    train = make_prompts(300, seed=1, exclude=held_out)
    assert len(train) == 300 and not any(r["prompt"] in held_out for r in train)
    # the same stream with the held-out draws skipped: rows outside the held-out set are unchanged
    kept = [r for r in plain if r["prompt"] not in held_out]
    assert train[:len(kept)] == kept
    assert all(int(r["answer"]) == sum(map(int, r["prompt"].split()[2].rstrip("?").split("+"))) for r in train)
    with pytest.raises(ValueError, match="outside the 1 excluded"):
        make_prompts(1, seed=0, low=1, high=1, exclude={"What is 1+1? Reply with the number only."})
