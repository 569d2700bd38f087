"""The `align` front door: help in whole sentences with an example that parses, one spelling per flag
(TRL's underscore names, old spellings still accepted), `align reward score`, per-recipe `--set`
examples, and `align plot` on a folder of runs. Everything goes through the real parser and commands.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from align.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SENTENCE = re.compile(r"^([A-Z`]|align ).*\.$")  # a capital, or the command's own name


def subparsers(parser: argparse.ArgumentParser, path=()):
    """(command words, parser) for every command and nested command (`data check`, `reward score`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from subparsers(sub, (*path, name))


PARSER = build_parser()
COMMANDS = list(subparsers(PARSER))
TOP = [words for words, _ in COMMANDS if len(words) == 1]


def help_text(words, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_align_alone_shows_the_commands_and_exits_2(capsys):
    """A newcomer's first `align`: the overview with every command, on stderr, not only an argparse complaint."""
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: align") and "commands:\n" in err
    assert [w[0] for w in TOP] == [line.split()[0] for line in err.split("commands:\n")[1].split("\n\n")[0].splitlines()]


def test_top_help_is_sentences_one_line_per_command():
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="100")
    out = subprocess.run([sys.executable, "-m", "align", "--help"], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    print(out)
    paragraphs = out.split("\n\n")
    assert SENTENCE.match(paragraphs[1].strip()) and "\n" not in paragraphs[1].strip(), "what the toolkit is"
    listing = out.split("commands:\n")[1].split("\n\n")[0].splitlines()
    named = [line.split()[0] for line in listing]
    assert named == [w[0] for w in TOP], "every command the parser knows is listed once, in order"
    for line in listing:
        assert SENTENCE.match(line.split(None, 1)[1]), line


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=" ".join)
def test_command_help_starts_with_a_sentence_and_an_example_that_parses(words, capsys, monkeypatch):
    out = help_text(words, capsys, monkeypatch)
    head = out.split("\n\n")[1]  # after the usage block
    assert SENTENCE.match(head.replace("\n", " ").strip()), head
    example = out.split("example:\n", 1)[1].splitlines()[0].strip()
    argv = shlex.split(example)
    assert argv[0] == "align" and tuple(argv[1:1 + len(words)]) == words, example
    PARSER.parse_args(argv[1:])  # the example is spelled as the parser spells its flags


@pytest.mark.parametrize("words,sub", COMMANDS, ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_help_shows_underscore_spellings_only(words, sub):
    shown = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    assert shown, words
    dashed = [o for o in shown if "-" in o[2:]]
    assert not dashed, f"align {' '.join(words)} shows {dashed}"
    text = sub.format_help()
    hidden = [o for o in sub._option_string_actions if o.startswith("--") and o not in shown]
    assert not [o for o in hidden if re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)], text


OLD_AND_NEW = [
    ("data check f.jsonl --model m --max-length 64 --no-chat-template",
     "data check f.jsonl --model_name_or_path m --max_length 64 --no_chat_template"),
    ("advise f.jsonl --model m --max-length 64", "advise f.jsonl --model_name_or_path m --max_length 64"),
    ("demo --quick --out o --model m", "demo --quick --output_dir o --model_name_or_path m"),
    ("dpo --config c.yaml --check-config --learning-rate 1e-4 --model m",
     "dpo --config c.yaml --check_config --learning_rate 1e-4 --model_name_or_path m"),
    ("ppo --config c.yaml --eval-only", "ppo --config c.yaml --eval_only"),
    ("reward score --pairs f.jsonl --model m --batch-size 4",
     "reward score f.jsonl --model_name_or_path m --per_device_eval_batch_size 4"),
    ("plot runs --out x.png", "plot runs --output_file x.png"),
    ("serve --base b --adapter-dir d --max-model-len 64 --no-zero-adapter",
     "serve --base b --adapter_dir d --max_model_len 64 --no_zero_adapter"),
    ("export --adapter a --merge o --max-new-tokens 3", "export --adapter a --merge o --max_new_tokens 3"),
]


@pytest.mark.parametrize("old,new", OLD_AND_NEW, ids=[n.split(" --")[0] for _, n in OLD_AND_NEW])
def test_old_spellings_parse_like_the_new_ones(old, new):
    as_new = vars(PARSER.parse_args(shlex.split(new)))
    assert vars(PARSER.parse_args(shlex.split(old))) == as_new  # an unknown spelling would be an error


def test_abbreviations_are_refused(capsys):
    with pytest.raises(SystemExit):
        PARSER.parse_args(["dpo", "--learning", "1e-4"])
    assert "unrecognized arguments: --learning" in capsys.readouterr().err


RECIPES = {"dpo": "dpo_tiny", "sft": "sft_tiny", "reward": "reward_tiny", "ppo": "ppo_tiny", "online-dpo": "online_dpo_tiny"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_set_example_uses_a_field_of_the_recipe(recipe, capsys, monkeypatch, tmp_path):
    text = help_text([recipe], capsys, monkeypatch)
    key, value = re.search(r"e\.g\. --set (\w+)=(\S+)", text).groups()
    assert f"same as --{key} {value}" in " ".join(text.split())
    # The example, run as shown: the recipe's own config accepts it and the resolved config has it.
    argv = [recipe, "--config", str(REPO / "configs" / f"{RECIPES[recipe]}.yaml"), "--set", f"{key}={value}",
            "--output_dir", str(tmp_path / "run"), "--check_config"]
    assert main(argv) == 0
    resolved = capsys.readouterr().out
    assert re.search(rf"^{key}: ", resolved, re.M), resolved


def test_reward_trains_by_default_and_scores_as_a_subcommand(capsys, tmp_path):
    config = str(REPO / "configs" / "reward_tiny.yaml")
    assert main(["reward", "--config", config, "--output_dir", str(tmp_path / "run"), "--check_config"]) == 0
    assert "# config OK: RewardConfig" in capsys.readouterr().out
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "2+3?", "completion": "5"}) + "\n")
    # Training flags with `score` are refused in one line, before any model loads (the model does not exist).
    assert main(["reward", "--learning_rate", "1e-3", "score", str(rows), "--model_name_or_path", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: align reward score: training flags") and "\n" not in err
    assert main(["reward", "score", "--model_name_or_path", "nowhere"]) == 2
    assert "expected FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the reward model is required by the parser itself
        main(["reward", "score", str(rows)])
    assert "--model_name_or_path" in capsys.readouterr().err


def write_metrics(folder: Path, losses: list[float]) -> None:
    folder.mkdir(parents=True)
    rows = [{"step": i + 1, "train/loss": v, "note": "text"} for i, v in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_a_folder_of_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_metrics(runs / "demo" / "dpo", [0.69, 0.5, 0.4])
    write_metrics(runs / "ppo-tiny", [1.0, 0.9])
    (runs / "empty").mkdir()
    assert main(["plot", str(runs)]) == 0
    out = capsys.readouterr().out
    for run in (runs / "demo" / "dpo", runs / "ppo-tiny"):
        png = run / "metrics.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{run}: {png}" in out
    # One run still goes where --output_file says; several runs cannot share one PNG.
    assert main(["plot", str(runs / "ppo-tiny"), "--output_file", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").is_file()
    assert main(["plot", str(runs), "--output_file", str(tmp_path / "two.png")]) == 2
    assert "holds 2 runs" in capsys.readouterr().err and not (tmp_path / "two.png").exists()
    assert main(["plot", str(runs / "empty")]) == 2
    assert "no metrics.jsonl in it or in any folder below it" in capsys.readouterr().err


def test_plot_a_parent_folder_with_one_run_below(tmp_path, capsys):
    """`align plot runs/demo`: the demo's folder holds its run one level down (dpo/) beside files that are not runs."""
    demo = tmp_path / "demo"
    write_metrics(demo / "dpo", [0.69, 0.6])
    (demo / "pairs.jsonl").write_text("{}\n")
    (demo / "tiny-model").mkdir()
    assert main(["plot", str(demo)]) == 0
    assert (demo / "dpo" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert str(demo / "dpo" / "metrics.png") in capsys.readouterr().out


def test_data_check_resolves_smollm2_like_the_recipes(tmp_path, tiny_llama, monkeypatch, capsys):
    """'smollm2' is a name only align knows: `data check` routes it through resolve_model to the cached folder
    (a tiny model stands in for the converted SmolLM2 in a fresh ALIGN_CACHE), never to the hub."""
    import shutil

    from align.core.smollm import MODEL_DIRNAME

    shutil.copytree(tiny_llama, tmp_path / "cache" / "models" / MODEL_DIRNAME)
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    rows = Path(__file__).parent / "data" / "prefs_tiny.jsonl"
    for flag in ("--model_name_or_path", "--model"):  # the README's spelling and the old one
        assert main(["data", "check", str(rows), flag, "smollm2", "--max_length", "256"]) == 0
        assert ", OK" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["sft", "reward"])
def test_a_run_says_in_one_line_which_dtype_auto_chose_and_why(recipe, tiny_llama, tmp_path, capsys):
    """The suite pins auto to float32 (ALIGN_AUTO_DTYPE, tests/conftest.py): the line names that reason."""
    argv = [recipe, "--config", f"configs/{recipe}_tiny.yaml", "--model_name_or_path", str(tiny_llama),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--save_steps", "0"]
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[align] dtype auto")]
    assert lines == ["[align] dtype auto: float32 (ALIGN_AUTO_DTYPE=float32)"]
