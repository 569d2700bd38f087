"""Training checkpoints in safetensors + JSON only (nothing is ever unpickled).

Layout of a run folder:
    checkpoints/step-000010/   adapters/<name>/ (PEFT), tensors.safetensors (optimizer,
                               heads, RNG), state.json (step, param-group hyper-parameters, ...)
    checkpoints/LATEST         name of the newest complete checkpoint
Each checkpoint is written under a temporary name and renamed into place, and
LATEST is replaced atomically afterwards, so a crash never leaves a half checkpoint
where resume would look.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from align.atomic import atomic_dir, atomic_write_text


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict, dict]:
    """Flatten an optimizer's state into named tensors plus JSON-able hyper-parameters."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{prefix}.{pid}.{k}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict,
                           prefix: str = "optim") -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> tuple[dict, dict]:
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"python_random": _jsonable(random.getstate()),
            "numpy_meta": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    kind, pos, has_gauss, cached = meta["numpy_meta"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuplify(meta["python_random"]))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(run_dir: str | os.PathLike, step: int, base, adapters: list[str],
                    tensors: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically: adapters (PEFT), tensors (safetensors), state (JSON)."""
    ckdir = Path(run_dir) / "checkpoints"
    final = ckdir / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        for name in adapters:
            base.save_adapter(name, tmp / "adapters" / name)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    atomic_write_text(ckdir / "LATEST", final.name)
    old = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        import shutil

        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckdir = Path(run_dir) / "checkpoints"
    pointer = ckdir / "LATEST"
    if not pointer.exists():
        return None
    path = ckdir / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer}: names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return (tensors, state) of a checkpoint folder."""
    path = Path(path)
    return load_file(str(path / "tensors.safetensors")), json.loads((path / "state.json").read_text())


def load_adapter_weights(base, name: str, folder: str | os.PathLike) -> None:
    """Copy saved adapter tensors into the live adapter `name` (same shapes), in place."""
    from peft.utils import set_peft_model_state_dict

    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(base.peft, weights, adapter_name=name)
    missing = [k for k in result.unexpected_keys]
    if missing:
        raise ValueError(f"{folder}: adapter tensors {missing[:3]} do not fit adapter {name!r}")
