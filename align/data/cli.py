"""`align data check SOURCE [--recipe R]`: validate a dataset for a recipe without training.

SOURCE is anything the trainers take: a .jsonl/.json/.parquet/.csv file, a save_to_disk
folder, a folder of data files (a cloned dataset repository), or a dataset name for `datasets.load_dataset` (`--dataset_config`, `--dataset_split`).

Rows are checked as the recipe reads them (`--recipe dpo|kto|reward|sft|grpo|rloo|ppo`, or `auto`: from the
first row's columns: label -> kto, chosen/rejected -> dpo, messages/completion/text -> sft, a prompt alone -> grpo).
Lists every bad row (file:line, field, what was expected) and exits non-zero if
there is any. With `--model_name_or_path`, rows are also tokenized to check that each prompt
leaves room for an answer under `--max_length`.
"""

from __future__ import annotations

import sys

RECIPES = ("dpo", "kto", "reward", "sft", "grpo", "rloo", "ppo")


def detect_recipe(record) -> str | None:
    """The recipe a row's columns are for: preference pairs, SFT rows, or RL prompts; None if none."""
    if not isinstance(record, dict):
        return None
    if "label" in record:  # TRL's unpaired preference rows (prompt, completion, label)
        return "kto"
    if "chosen" in record and "rejected" in record:
        return "dpo"
    if any(k in record for k in ("messages", "completion", "text")):
        return "sft"
    return "grpo" if "prompt" in record else None


def first_record(source, split: str, config: str | None):
    from align.data.issues import DataIssue
    from align.data.sources import read_source

    for _, record in read_source(source, split, config):
        if not isinstance(record, DataIssue):
            return record
    return None


def add_arguments(p) -> None:
    import argparse

    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="check (the only action)")
    c = sub.add_parser("check", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Checks a dataset without training, as --recipe reads it (default: from the first "
                                   "row's columns),\nand lists every bad row (file:line, field, what was expected); "
                                   "it exits non-zero if there is any.\n\nexample:\n"
                                   "  align data check my_pairs.jsonl --model_name_or_path smollm2 --max_length 256")
    c.add_argument("file", metavar="SOURCE", help=".jsonl/.json/.parquet/.csv file, save_to_disk folder, folder of "
                                                 "data files or dataset name")
    c.add_argument("--dataset_config", default=None, help="a dataset name's configuration")
    c.add_argument("--dataset_split", default="train", help="the split, for a dataset name or a DatasetDict")
    c.add_argument("--recipe", default="auto", choices=["auto", *RECIPES],
                   help="the recipe whose rows to check for (auto: from the first row's columns)")
    c.add_argument("--format", default="auto", choices=["auto", "standard", "conversational"])
    # `--model` was this flag's name before it took the recipes' name: kept as a hidden alias.
    c.add_argument("--model_name_or_path", "--model", dest="model", metavar="MODEL",
                   help="tokenizer (model folder, 'smollm2' or hub id) to check lengths with")
    c.add_argument("--max_length", type=int, default=512, help="token budget for prompt + answer")
    c.add_argument("--chat_template", action="store_true",
                   help="write string rows through the tokenizer's chat template (the recipes' chat_template: true); "
                        "by default they are plain text, as TRL tokenises them")
    c.add_argument("--no_chat_template", action="store_true", help=argparse.SUPPRESS)  # the old default's opt-out


def run(args) -> int:
    from align.data.issues import DataError

    recipe = args.recipe
    if recipe == "auto":
        try:
            first = first_record(args.file, args.dataset_split, args.dataset_config)
        except DataError as e:  # the source itself cannot be read: said as every recipe's check says it
            return check_rows(args, 0, list(e.issues))
        recipe = detect_recipe(first)
        if recipe is None:
            print(f"{args.file}: no row with the columns of any recipe (label, chosen/rejected, messages, "
                  f"completion, text or prompt); give --recipe", file=sys.stderr)
            return 1
        print(f"{args.file}: checked as {recipe} rows (--recipe to choose)", file=sys.stderr)
    if recipe == "sft":
        return check_rows(args, *_sft_rows(args))
    if recipe in ("grpo", "rloo", "ppo"):
        return check_rows(args, *_prompt_rows(args))
    if recipe == "kto":
        return check_rows(args, *_unpaired_rows(args))
    return check_preferences(args)


def _sft_rows(args) -> tuple[int, list]:
    from align.data.issues import DataError
    from align.data.sft import load_sft

    try:
        rows, issues = load_sft(args.file, on_bad_rows="skip", split=args.dataset_split)
    except DataError as e:
        return 0, list(e.issues)
    return len(rows), list(issues)


def _prompt_rows(args) -> tuple[int, list]:
    from align.data.issues import DataError
    from align.data.prompt_rows import load_prompt_rows

    try:
        return len(load_prompt_rows(args.file, split=args.dataset_split, config=args.dataset_config)), []
    except DataError as e:
        return 0, list(e.issues)


def _unpaired_rows(args) -> tuple[int, list]:
    """KTO's rows (pairs count as their two unpaired rows); with a model, each prompt's room under max_length."""
    from align.data.issues import DataError
    from align.data.unpaired import load_unpaired, tokenize_unpaired

    try:
        data = load_unpaired(args.file, args.format, "skip", args.dataset_split, args.dataset_config)
    except DataError as e:
        return 0, list(e.issues)
    issues, valid = list(data.skipped), len(data.rows)
    if args.model:
        from align.core.loading import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model(args.model))
        try:
            tokenize_unpaired(data.rows, tok, args.max_length, args.chat_template and not args.no_chat_template, on_bad_rows="error")
        except DataError as e:
            issues.extend(e.issues)
            valid -= len(e.issues)
    return valid, issues


def check_rows(args, valid: int, issues: list) -> int:
    for issue in issues:
        print(issue)
    status = "OK" if not issues else f"{len(issues)} problem(s)"
    print(f"{args.file}: {valid} valid rows, {status}", file=sys.stderr if issues else sys.stdout)
    return 1 if issues or not valid else 0


def check_preferences(args) -> int:
    from align.data.preference import DataError, load_preferences, tokenized_issues

    try:
        data = load_preferences(args.file, fmt=args.format, on_bad_rows="skip", split=args.dataset_split,
                                config=args.dataset_config)
    except DataError as e:
        for issue in e.issues:
            print(issue)
        print(f"{args.file}: {len(e.issues)} problem(s), no valid rows", file=sys.stderr)
        return 1
    issues = list(data.skipped)
    valid = len(data.rows)
    if args.model:
        from align.core.loading import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model(args.model))  # 'smollm2' is a name only align knows, as in the recipes
        bad = tokenized_issues(data.rows, tok, args.max_length, args.chat_template and not args.no_chat_template)
        issues.extend(bad)
        valid -= len(bad)
    for issue in issues:
        print(issue)
    total = len(data.rows) + len(data.skipped)
    status = "OK" if not issues else f"{len(issues)} bad row(s)"
    print(f"{args.file}: {total} rows, {valid} valid, {status}", file=sys.stderr if issues else sys.stdout)
    return 1 if issues else 0
