"""Every `align` command line of README.md's ```bash blocks runs, so the README cannot rot.

Training recipes (dpo, kto, orpo, cpo, sft, reward, ppo, grpo, rloo, online-dpo) run as written plus `--check_config`, on the tiny
model (`--model_name_or_path`) and a fresh `--output_dir`: the config, every flag and the output folder
policy are checked, nothing is trained. `data check`, `advise`, `--help` and `plot` run for real, on the
tiny model and the repository's tiny data. Data files the reader brings (my_pairs.jsonl, my_feedback.jsonl) or earlier
README steps write (runs/sft.jsonl, runs/pairs.jsonl) are the repository's tiny files of that kind, and
the reader's `trl grpo` file (grpo.yaml) is the tests' own (tests/data/trl/grpo_lora.yaml).
Folders earlier README steps write and later lines read (the SFT adapter, the reward model) are made by
one-step tiny runs of those recipes (`earlier_outputs`).
`accelerate launch ... -m align CMD` runs `align CMD` in this process: a checked config starts no processes.

Lines not run, each with its reason, are NOT_RUN (align lines) and OTHER (lines that do not invoke
align); a README line in neither and not run fails test_every_readme_line_is_run_or_says_why.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from align.cli import main

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"dpo", "kto", "orpo", "cpo", "sft", "reward", "ppo", "grpo", "rloo", "online-dpo"}
DATA = ROOT / "tests" / "data"
FILES = {"my_pairs.jsonl": DATA / "prefs_tiny.jsonl", "my_feedback.jsonl": DATA / "kto_tiny.jsonl", "runs/pairs.jsonl": DATA / "prefs_tiny.jsonl",
         "runs/sft.jsonl": DATA / "sft_tiny.jsonl", "grpo.yaml": DATA / "trl" / "grpo_lora.yaml"}
EARLIER = ("runs/sft-smollm2/adapter", "runs/reward_demo/reward_model")  # see earlier_outputs
# A part of a README line -> why that line is not run.
NOT_RUN = {
    "align serve": "starts a server that runs until stopped (tests/test_serve.py starts real ones)",
}


# The start of a README line that is not align's -> why it is not run.
OTHER = {
    "bash scripts/demo.sh": "sets up the venv and runs `align demo` on SmolLM2 for minutes; tests/test_demo.py runs "
                            "`align demo --quick`",
    "bash scripts/test.sh": "the test suite this file is part of",
    "trl grpo": "TRL's own CLI, the 'before' half of the example; the align half runs a `trl grpo` file of the tests",
    "curl ": "talks to the `align serve` line above it, which is not run",
    "mkdir -p runs": "makes the folder the next line writes into; the tests write to tmp folders",
    ".venv/bin/python -c": "writes runs/sft.jsonl; the next line reads tests/data/sft_tiny.jsonl in its place",
}


def bash_lines(text: str) -> list[str]:
    """The command lines of the ```bash blocks: continuations joined, comments dropped."""
    lines, block, current = [], False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        current += " " + raw.rstrip().removesuffix("\\")
        if not raw.rstrip().endswith("\\"):
            line = re.sub(r"(^|\s)#.*$", "", current).strip()
            if line:
                lines.append(line)
            current = ""
    return lines


def align_argv(line: str) -> list[str] | None:
    """The arguments after `align` (or `.venv/bin/align`, or `-m align`), None for a line that is not align's."""
    words = shlex.split(line)
    for i, word in enumerate(words):
        if word in ("align", ".venv/bin/align") or (word == "align" and words[i - 1] == "-m"):
            return words[i + 1:]
    return None


README_COMMANDS = [(line, argv) for line in bash_lines((ROOT / "README.md").read_text())
                   if (argv := align_argv(line)) is not None]
TO_RUN = [(line, argv) for line, argv in README_COMMANDS if not any(part in line for part in NOT_RUN)]


def test_every_readme_line_is_run_or_says_why():
    lines = bash_lines((ROOT / "README.md").read_text())
    others = [line for line in lines if align_argv(line) is None]
    assert len(TO_RUN) >= 10, [line for line, _ in README_COMMANDS]
    unexplained = [line for line in others if not any(line.startswith(start) for start in OTHER)]
    assert not unexplained, f"README lines neither run nor listed in OTHER: {unexplained}"
    # Every exception still names a README line, so neither list outlives what it excuses.
    for part in NOT_RUN:
        assert any(part in line for line, _ in README_COMMANDS), f"NOT_RUN: no README line has {part!r} any more"
    for start in OTHER:
        assert any(line.startswith(start) for line in others), f"OTHER: no README line starts {start!r} any more"


@pytest.fixture(scope="module")
def earlier_outputs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """README folder -> the same kind of folder from a one-step tiny run (SFT adapter, reward model)."""
    tmp = tmp_path_factory.mktemp("earlier")
    common = ["--model_name_or_path", str(tiny_llama), "--max_steps", "1", "--save_steps", "0"]
    assert main(["sft", "--config", "configs/sft_tiny.yaml", "--output_dir", str(tmp / "sft"), *common]) == 0
    assert main(["reward", "--config", "configs/reward_tiny.yaml", "--output_dir", str(tmp / "rm"), *common]) == 0
    return {"runs/sft-smollm2/adapter": tmp / "sft" / "adapter", "runs/reward_demo/reward_model": tmp / "rm" / "reward_model"}


def prepared(argv: list[str], model: Path, tmp: Path, earlier) -> list[str]:
    """The README's arguments with the reader's files, the model and run folders replaced (see the docstring)."""
    out = []
    for i, word in enumerate(argv):
        if i and argv[i - 1] in ("--model_name_or_path", "--model"):
            word = str(model)
        elif word in FILES:
            word = str(FILES[word])
        elif word in EARLIER:
            word = str(earlier()[word])
        elif argv[0] == "plot" and word.startswith("runs/"):
            word = str(tmp / word)
        out.append(word)
    if argv[0] in TRAINING and "--help" not in argv:
        out += ["--model_name_or_path", str(model), "--output_dir", str(tmp / "run"), "--check_config"]
    return out


def write_run(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.69}\n{"step": 2, "train/loss": 0.6}\n')


@pytest.mark.parametrize(("line", "argv"), TO_RUN, ids=[line[:80] for line, _ in TO_RUN])
def test_readme_command_runs(line, argv, tiny_llama, tmp_path, capsys, request):
    args = prepared(argv, tiny_llama, tmp_path, lambda: request.getfixturevalue("earlier_outputs"))
    if args[0] == "plot":
        write_run(Path(args[1]))
    if "--help" in args:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        code = exit_.value.code or 0
    else:
        code = main(args)  # an exception (a traceback for the reader) fails the test here
    err = capsys.readouterr().err
    assert code == 0, f"{line}\n  ran as: align {shlex.join(args)}\n{err}"
    assert "Traceback" not in err
