"""Programmatic rewards: built-ins by hand, user `module:function`, weighted combination, row-named errors."""

import textwrap

import pytest

from reward.functions import RewardError, combine, compute_rewards, get_reward_fn

USER_MODULE = textwrap.dedent('''
    import math

    def exclaims(prompts, completions, answers):
        return [float(c.count("!")) for c in completions]

    def fails_on_x(prompts, completions, answers):
        out = []
        for c in completions:
            if "x" in c:
                raise ValueError("cannot score an x")
            out.append(1.0)
        return out

    def nan_on_x(prompts, completions, answers):
        return [math.nan if "x" in c else 1.0 for c in completions]

    def too_few(prompts, completions, answers):
        return [1.0]

    NOT_A_FUNCTION = 3
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


PROMPTS = ["What is 2+3? Reply with the number only."] * 4
COMPLETIONS = ["5", "2 + 3 = 5", "6", "The answer is five"]
ANSWERS = ["5"] * 4


def test_arithmetic_matches_the_task_score():
    # "5" bare and correct -> 1; "2 + 3 = 5" last integer correct -> 0.5; "6" -> 0; no integer -> 0
    assert compute_rewards("arithmetic", PROMPTS, COMPLETIONS, ANSWERS) == [1.0, 0.5, 0.0, 0.0]


def test_arithmetic_needs_answers():
    with pytest.raises(RewardError, match="reference answers"):
        compute_rewards("arithmetic", PROMPTS, COMPLETIONS, None)
    with pytest.raises(RewardError, match="row 2 has no reference answer"):
        compute_rewards("arithmetic", PROMPTS[:3], COMPLETIONS[:3], ["5", "5", None])


def test_format_and_length_penalty_by_hand():
    assert compute_rewards("format", PROMPTS, [" 5.", "2 + 3 = 5", "-12", "five"]) == [1.0, 0.0, 1.0, 0.0]
    # default: -0.01 per character: lengths 1, 9, 1, 18
    assert compute_rewards("length_penalty", PROMPTS, COMPLETIONS) == pytest.approx([-0.01, -0.09, -0.01, -0.18])
    # limit 8, 0.5 per character beyond: 0, -(9-8)*0.5, 0, -(18-8)*0.5
    fn = get_reward_fn("length_penalty(limit=8, per_char=0.5)")
    assert compute_rewards(fn, PROMPTS, COMPLETIONS) == pytest.approx([0.0, -0.5, 0.0, -5.0])


def test_combine_weighted_sum_and_parts(user_module):
    fn = combine([("arithmetic", 1.0), ("format", 0.5), (f"{user_module}:exclaims", -2.0)])
    completions = ["5", "2 + 3 = 5!", "6!!", "x"]
    parts = fn.parts(PROMPTS, completions, ANSWERS)
    assert parts == {"arithmetic": [1.0, 0.5, 0.0, 0.0], "format": [1.0, 0.0, 0.0, 0.0],
                     f"{user_module}:exclaims": [0.0, 1.0, 2.0, 0.0]}
    # 1 + 0.5*1 - 0 = 1.5;  0.5 + 0 - 2*1 = -1.5;  0 + 0.5*0 - 2*2 = -4;  0
    assert compute_rewards(fn, PROMPTS, completions, ANSWERS) == pytest.approx([1.5, -1.5, -4.0, 0.0])


def test_combine_accepts_functions_and_checks_weights():
    fn = combine([(lambda p, c, a: [1.0] * len(c), 3.0), ("format", 1.0)])
    assert fn(PROMPTS[:2], ["5", "no"]) == [4.0, 3.0]
    with pytest.raises(RewardError, match="weight"):
        combine([("format", float("nan"))])
    with pytest.raises(RewardError, match="at least one"):
        combine([])


def test_user_function_errors_name_the_row(user_module):
    completions = ["ok", "fine", "has x", "ok"]
    with pytest.raises(RewardError, match=r"fails_on_x failed on row 2 .*'has x'.*ValueError: cannot score an x"):
        compute_rewards(f"{user_module}:fails_on_x", PROMPTS, completions, ANSWERS)
    with pytest.raises(RewardError, match=r"nan_on_x returned nan on row 2 .*expected a finite number"):
        compute_rewards(f"{user_module}:nan_on_x", PROMPTS, completions, ANSWERS)
    with pytest.raises(RewardError, match="returned 1 values for 4 rows"):
        compute_rewards(f"{user_module}:too_few", PROMPTS, completions, ANSWERS)
    # Inside a combination, the failing part and row are still named.
    with pytest.raises(RewardError, match=r"nan_on_x returned nan on row 2"):
        combine([("format", 1.0), (f"{user_module}:nan_on_x", 1.0)])(PROMPTS, completions, ANSWERS)


def test_bad_specs_are_clear(user_module):
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        get_reward_fn("no_such_module_xyz:score")
    with pytest.raises(RewardError, match=f"module '{user_module}' has no attribute 'missing'"):
        get_reward_fn(f"{user_module}:missing")
    with pytest.raises(RewardError, match="'NOT_A_FUNCTION' is a int, expected a function"):
        get_reward_fn(f"{user_module}:NOT_A_FUNCTION")
    with pytest.raises(RewardError, match=r"expected 'module:function'"):
        get_reward_fn(":score")
    with pytest.raises(RewardError, match=r"unknown name; expected one of \['arithmetic', 'format', 'length_penalty'\]"):
        get_reward_fn("accuracy")
    with pytest.raises(RewardError, match=r"unknown argument\(s\) \['limt'\]"):
        get_reward_fn("length_penalty(limt=3)")
    with pytest.raises(RewardError, match="expected name"):
        get_reward_fn("length_penalty(3)")


def test_chat_message_completions_are_read_as_text():
    completion = [{"role": "assistant", "content": "5"}]
    assert compute_rewards("arithmetic", PROMPTS[:1], [completion], ["5"]) == [1.0]


def test_length_mismatch_is_refused():
    with pytest.raises(RewardError, match="expected equal lengths"):
        compute_rewards("format", PROMPTS[:2], COMPLETIONS[:3])


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
