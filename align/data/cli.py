"""`align data check SOURCE`: validate a preference dataset without training.

SOURCE is anything the trainers take: a .jsonl/.json/.parquet/.csv file, a save_to_disk
folder, a folder of data files (a cloned dataset repository), or a dataset name for `datasets.load_dataset` (`--dataset_config`, `--dataset_split`).

Lists every bad row (file:line, field, what was expected) and exits non-zero if
there is any. With `--model_name_or_path`, rows are also tokenized to check that each prompt
leaves room for an answer under `--max_length`.
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    import argparse

    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="check (the only action)")
    c = sub.add_parser("check", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Checks a preference dataset without training and lists every bad row (file:line, "
                                   "field, what was expected);\nit exits non-zero if there is any.\n\nexample:\n"
                                   "  align data check my_pairs.jsonl --model_name_or_path smollm2 --max_length 256")
    c.add_argument("file", metavar="SOURCE", help=".jsonl/.json/.parquet/.csv file, save_to_disk folder, folder of "
                                                 "data files or dataset name")
    c.add_argument("--dataset_config", default=None, help="a dataset name's configuration")
    c.add_argument("--dataset_split", default="train", help="the split, for a dataset name or a DatasetDict")
    c.add_argument("--format", default="auto", choices=["auto", "standard", "conversational"])
    # `--model` was this flag's name before it took the recipes' name: kept as a hidden alias.
    c.add_argument("--model_name_or_path", "--model", dest="model", metavar="MODEL",
                   help="tokenizer (model folder, 'smollm2' or hub id) to check lengths with")
    c.add_argument("--max_length", type=int, default=512, help="token budget for prompt + answer")
    c.add_argument("--no_chat_template", action="store_true", help="do not apply the tokenizer's chat template")


def run(args) -> int:
    from align.data.preference import DataError, load_preferences, tokenize_preferences

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
        try:
            tokenize_preferences(data.rows, tok, args.max_length, not args.no_chat_template, on_bad_rows="error")
        except DataError as e:
            issues.extend(e.issues)
            valid -= len(e.issues)
    for issue in issues:
        print(issue)
    total = len(data.rows) + len(data.skipped)
    status = "OK" if not issues else f"{len(issues)} bad row(s)"
    print(f"{args.file}: {total} rows, {valid} valid, {status}", file=sys.stderr if issues else sys.stdout)
    return 1 if issues else 0
