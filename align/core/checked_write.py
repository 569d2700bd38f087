"""What every export does last (and a full fine-tuning reward run, which saves a classifier): write the model
and tokenizer, reload what was written, check it against the source, and only then let the folder appear
(atomically) with its metadata (align_export.json).

The check reads the files, not the model in memory: the folder is what other engines will load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from align.core.errors import UserError


def write_checked(out: str | Path, model, tokenizer, model_class, dtype: str,
                  check: Callable[[object], str | dict], meta: dict, meta_name: str = "align_export.json") -> Path:
    """Write `model` and `tokenizer` to `out`, reload it as `model_class` in `dtype`, and run `check`.

    check(reloaded) returns an error message (UserError: nothing is written to `out`) or figures
    added to `meta` in `meta_name`.
    """
    from align.core.atomic import atomic_dir
    from align.core.loading import resolve_dtype

    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = model_class.from_pretrained(tmp, dtype=resolve_dtype(dtype), use_safetensors=True).eval()
        result = check(reloaded)
        if isinstance(result, str):
            # A 16-bit export rounds the weights; float32 is the dtype whose check is exact.
            raise UserError(f"{result}; nothing was written to {out}"
                            + (" (try --dtype float32)" if dtype != "float32" else ""))
        (tmp / meta_name).write_text(json.dumps({**meta, **result}, indent=2))
    return out
