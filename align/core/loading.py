"""Finding and loading what a base model is made of: its folder (or hub id), dtype, 4-bit settings, tokenizer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from align.core.errors import UserError

# "name" or "org/name" as the hub spells repository ids; a path ("./x", "/x", "a/b/c") is not one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?")


def resolve_model(name: str) -> str:
    """Where to load the model called `name` from; every recipe and CLI resolves `model:` here.

    'smollm2' -> the offline SmolLM2-135M-Instruct folder (built from its PyPI wheel on first
    use); an existing local folder -> itself; a hub id ("org/name" or "name") -> unchanged, for
    transformers to resolve from its cache or the hub. Anything else is a path that does not exist.
    """
    if name == "smollm2":
        from align.core.smollm import ensure_smollm2

        return str(ensure_smollm2())
    if name and Path(name).is_dir():  # Path('') is the working directory
        return name
    if _HUB_ID.fullmatch(name) and ".." not in name:
        return name
    raise UserError(f"model_name_or_path: {name!r} is neither 'smollm2', an existing model folder, "
                    f"nor a hub id ('org/name')")


def resolve_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


@dataclass(frozen=True)
class FourBit:
    """QLoRA's frozen base: linear layers stored in 4 bits by bitsandbytes (transformers' BitsAndBytesConfig names)."""

    bnb_4bit_quant_type: str = "nf4"  # "nf4" (QLoRA's NormalFloat) or "fp4"
    bnb_4bit_use_double_quant: bool = True  # quantise the per-block scales too (~0.4 bit/weight less)
    bnb_4bit_compute_dtype: str = "bfloat16"  # what the 4-bit weights are dequantised to for each matmul

    def __post_init__(self):
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type: expected 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}")
        if self.bnb_4bit_compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"bnb_4bit_compute_dtype: expected float32, bfloat16 or float16, "
                             f"got {self.bnb_4bit_compute_dtype!r}")

    def bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=resolve_dtype(self.bnb_4bit_compute_dtype))


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # a broken install counts as missing
        raise UserError(f"load_in_4bit: needs the bitsandbytes package (pip install 'align[qlora]'): {e}") from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
