"""Tokenising rows through `datasets.map`, cached on disk under a key of everything the tokens depend on.

The key is a hash of the rows (text and place), the tokenizer (its full serialised form, chat
template and special tokens), the token budget and the chat-template switch, so a second load of
the same data (a resumed run, a rerun, `align data check --model`) reads the cached Arrow file
instead of tokenising again, and any change makes a new file. Files live in the `datasets`
cache (HF_DATASETS_CACHE) under align_tokenized/.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Bump when what a cached file holds changes meaning.
FORMAT = "align-pairs-v1"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides how a tokenizer turns text into ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary stands in for its serialised form
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
             tokenizer.special_tokens_map, getattr(tokenizer, "add_bos_token", None),
             getattr(tokenizer, "add_eos_token", None)]
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(texts: list[str], places: list[str], tokenizer, **settings) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, tokenizer_fingerprint(tokenizer), settings], sort_keys=True).encode())
    for text, where in zip(texts, places, strict=True):
        h.update(where.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def cache_dir() -> Path | None:
    """Where tokenised files go, or None when `datasets` caching is disabled."""
    import datasets

    if not datasets.is_caching_enabled():
        return None
    return Path(os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE) / "align_tokenized"


def cached_map(columns: dict[str, list], function, fn_kwargs: dict, key: str, desc: str):
    """`Dataset.from_dict(columns).map(function)`, its result cached at align_tokenized/KEY.arrow.

    Without `datasets` installed (a bare GPU image has torch, transformers and peft only) the rows
    are tokenised in a loop, uncached: the same columns, so callers cannot tell.
    """
    try:
        import datasets
    except ImportError:
        n = len(next(iter(columns.values())))
        out = [function({k: v[i] for k, v in columns.items()}, **fn_kwargs) for i in range(n)]
        return {k: [row[k] for row in out] for k in (out[0] if out else {})}

    folder = cache_dir()
    path = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        path = str(folder / f"{key}.arrow")
    ds = datasets.Dataset.from_dict(columns)
    return ds.map(function, fn_kwargs=fn_kwargs, cache_file_name=path, load_from_cache_file=path is not None,
                  new_fingerprint=key, desc=desc)
