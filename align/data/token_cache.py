"""Tokenising rows, cached on disk under a key of everything the tokens depend on.

The key is a hash of the rows (text and place), the tokenizer (its full serialised form, chat
template and special tokens), the token budget and the chat-template switch, so a second load of
the same data (a resumed run, a rerun, `align data check --model`) reads the cached file instead
of tokenising again, and any change makes a new file. Files are safetensors (ids and row ends),
in the `datasets` cache folder (HF_DATASETS_CACHE) under align_tokenized/; `datasets` itself is
not needed to write or read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

# Bump when what a cached file holds changes meaning.
FORMAT = "align-tokens-v3"  # v3: TRL 1.16's prompt/completion split


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
    """Where tokenised files go: align_tokenized/ in the `datasets` cache, or None when its caching is off.

    `datasets` is consulted only when something already imported it (a hub dataset, a `Dataset` passed in):
    importing it costs ~120 MB of resident memory, a fifth of SmolLM2's weights, for a local JSONL run.
    """
    datasets = sys.modules.get("datasets")
    if datasets is not None:
        if not datasets.is_caching_enabled():
            return None
        return Path(os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE) / "align_tokenized"
    from huggingface_hub import constants  # HF_HOME as `datasets` derives its default cache from it

    return Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets") / "align_tokenized"


def cached_map(columns: dict[str, list], function, fn_kwargs: dict, key: str, desc: str) -> dict[str, list]:
    """`function(row, **fn_kwargs)` over the rows of `columns`, its result cached at align_tokenized/KEY.safetensors.

    `function` returns a dict of token-id lists and strings; the result is those columns. The file holds,
    per id column, the ids end to end (int64) and each row's end offset; string columns ride in the
    safetensors header. Written atomically, so a kill mid-write leaves no half-file to be read back.
    """
    folder = cache_dir()
    path = folder / f"{key}.safetensors" if folder is not None else None
    if path is not None and path.is_file():
        from safetensors import SafetensorError

        try:
            return _read(path)
        except (OSError, ValueError, KeyError, SafetensorError):  # damaged: tokenise again and replace it
            pass
    n = len(next(iter(columns.values()))) if columns else 0
    rows = [function({k: v[i] for k, v in columns.items()}, **fn_kwargs)
            for i in tqdm(range(n), desc=desc, unit="row", disable=n < 1000, leave=False)]
    out = {k: [row[k] for row in rows] for k in (rows[0] if rows else {})}
    if path is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write(path, out)
        except OSError as e:  # a read-only or full cache costs the next run a re-tokenisation, not this run
            print(f"[align] tokenisation cache not written ({e}); the next run tokenises again", file=sys.stderr)
    return out


def _write(path: Path, out: dict[str, list]) -> None:
    import torch
    from safetensors.torch import save

    from align.core.atomic import atomic_write_bytes

    tensors, texts = {}, {}
    for name, values in out.items():
        if all(isinstance(v, str) for v in values):
            texts[name] = values
            continue
        lengths = torch.tensor([len(v) for v in values], dtype=torch.int64)
        tensors[f"{name}.ids"] = torch.tensor([t for v in values for t in v], dtype=torch.int64)
        tensors[f"{name}.ends"] = torch.cumsum(lengths, 0)
    atomic_write_bytes(path, save(tensors, metadata={"format": FORMAT, "texts": json.dumps(texts)}))


def _read(path: Path) -> dict[str, list]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an {FORMAT} file")
        out: dict[str, list] = json.loads(meta["texts"])
        for name in {k.rsplit(".", 1)[0] for k in f.keys()}:
            ids, ends = f.get_tensor(f"{name}.ids").tolist(), f.get_tensor(f"{name}.ends").tolist()
            out[name] = [ids[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    return out
