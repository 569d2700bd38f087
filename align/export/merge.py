"""`align export`: fold an adapter into its base, for engines without LoRA support.

    align export --adapter runs/dpo/adapter --merge exported/ [--base BASE]
    align export --reward runs/reward exported-rm/ [--base BASE]

Writes a full model (safetensors) plus the tokenizer, atomically, and only after the saved model's
greedy output equals the adapter's on a few prompts; otherwise nothing is written and it fails.
OUT must be new or empty (--overwrite replaces one that holds files) and apart from every folder
the export reads; the sources are checked before any model loads (align/export/guard.py).
With --reward, the model is a transformers sequence-classifier (align.export.reward) whose
logits are checked against the reward model's own scores instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from align.core.adapter_files import find_base
from align.core.checked_write import write_checked
from align.core.errors import UserError

DEFAULT_PROMPTS = (
    "What is 12+7? Reply with the number only.",
    "The quick brown fox",
    "Hello, how are you?",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="PEFT adapter folder (e.g. a trained policy).")
    p.add_argument("--merge", metavar="OUT", help="Folder to write the merged model to.")
    p.add_argument("--reward", metavar="RUN_OR_REWARD_DIR",
                   help="Export a reward model (a reward run folder or its reward_model/) as a transformers "
                        "AutoModelForSequenceClassification (num_labels=1) to OUT.")
    p.add_argument("out", nargs="?", metavar="OUT", help="Folder to write to (with --reward; or use --merge).")
    p.add_argument("--base", default=None,
                   help="Base model folder (default: from the adapter's align_meta.json or adapter_config.json).")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="Merge, check and save in this dtype. float32 keeps greedy output exact; a 16-bit merge "
                        "rounds the weights and may fail the check.")
    p.add_argument("--prompt", action="append", default=None,
                   help="A prompt for the greedy check (repeatable; default: three fixed prompts).")
    p.add_argument("--max-new-tokens", type=int, default=24, help="Greedy tokens compared per prompt.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace OUT when it already holds files (never a folder the export reads from).")


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation token ids of each prompt, one at a time (no padding to reason about)."""
    import torch

    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def checked_sources(adapter: Path, out: Path, base: str | Path | None, overwrite: bool) -> Path:
    """Every check that needs no model: the output policy, the adapter's files, the base. Returns the base."""
    from align.core.adapter_files import BaseInfo
    from align.export.guard import check_apart, check_output, checked_adapter, source_folders
    from align.serve.adapters import AdapterRefused, check_adapter

    check_output(out, source_folders(adapter, "--adapter folder"), overwrite)
    info = checked_adapter(adapter, "--adapter")
    base_path = find_base(adapter, None if base is None else str(base))
    check_apart(out, [("base model folder", Path(os.path.realpath(base_path)))])
    try:
        base_info = BaseInfo.read(base_path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"base model folder: {e}") from None
    try:
        check_adapter(info, base_info, max_rank=info.rank)
    except AdapterRefused as e:
        raise UserError(e.message) from None
    return base_path


def export_merged(adapter: str | Path, out: str | Path, base: str | Path | None = None, dtype: str = "float32",
                  prompts: list[str] | None = None, max_new_tokens: int = 24, overwrite: bool = False) -> Path:
    """Merge `adapter` into its base and write it to `out`; raise UserError if greedy outputs differ.

    `out` must be new or empty (or `overwrite`), and apart from the adapter, its run folder and the base.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.core.loading import load_tokenizer, resolve_dtype

    adapter, out = Path(adapter), Path(out)
    prompts = list(prompts or DEFAULT_PROMPTS)
    base_path = checked_sources(adapter, out, base, overwrite)

    torch_dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(str(base_path))
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype, use_safetensors=True)
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    expected = greedy(model, tokenizer, prompts, max_new_tokens)

    def check(reloaded) -> str | dict:
        got = greedy(reloaded, tokenizer, prompts, max_new_tokens)
        for prompt, want, have in zip(prompts, expected, got, strict=True):
            if want != have:
                return (f"merged model's greedy output differs from the adapter's for prompt {prompt!r}:\n"
                        f"  adapter: {tokenizer.decode(want)!r}\n  merged:  {tokenizer.decode(have)!r}")
        return {}

    meta = {"adapter": str(adapter.resolve()), "base": str(base_path.resolve()), "dtype": dtype,
            "checked_prompts": prompts, "max_new_tokens": max_new_tokens}
    return write_checked(out, model.merge_and_unload(), tokenizer, AutoModelForCausalLM, dtype, check, meta)


def run(args: argparse.Namespace) -> int:
    if args.reward:
        from align.export.reward import export_reward

        out = args.out or args.merge
        if not out or args.adapter:
            raise UserError("export --reward RUN_OR_REWARD_DIR OUT: expected an output folder and no --adapter")
        done, bias = export_reward(args.reward, out, args.base, args.dtype, overwrite=args.overwrite)
        print(f"wrote sequence-classification reward model to {done} (logits checked against the reward model"
              + (f"; its head bias {bias:.4g} is left out, which shifts every reward equally)" if bias else ")"))
        return 0
    if not args.adapter or not (args.merge or args.out):
        raise UserError("export: expected --adapter ADAPTER --merge OUT, or --reward RUN_OR_REWARD_DIR OUT")
    args.merge = args.merge or args.out
    out = export_merged(args.adapter, args.merge, args.base, args.dtype, args.prompt, args.max_new_tokens,
                        args.overwrite)
    print(f"wrote merged model to {out} (greedy output checked on {len(args.prompt or DEFAULT_PROMPTS)} prompts)")
    return 0
