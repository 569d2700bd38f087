"""Everything a run needs to continue exactly, saved and restored by one module for every recipe.

A checkpoint folder (safetensors + JSON only: nothing is ever unpickled):
    checkpoints/step-000010/  adapters/<name>/   the trained adapters, PEFT format
                              tensors.safetensors optimizer state, heads, RNG state
                              state.json          step, optimizer hyper-parameters, scheduler, recipe extras
    checkpoints/LATEST        name of the newest complete checkpoint
Each checkpoint is built under a temporary name and renamed into place; LATEST is
replaced atomically afterwards and old checkpoints are deleted only then, so a kill at
any moment leaves a complete checkpoint where resume looks. The data position is the
step itself: every recipe's data order is a pure function of (seed, step).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from align.atomic import atomic_dir, atomic_write_text
from align.errors import UserError

CHECKPOINTS = "checkpoints"


# -- pieces -----------------------------------------------------------------------------------------
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
        if key.startswith(prefix + "."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> tuple[dict, dict]:
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python_random": _jsonable(random.getstate()),
            "numpy_meta": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy_meta"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuplify(meta["python_random"]))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def load_adapter_weights(base, name: str, folder: str | os.PathLike) -> None:
    """Copy saved adapter tensors into the live adapter `name` (same shapes), in place."""
    from peft.utils import set_peft_model_state_dict

    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(base.peft, weights, adapter_name=name)
    if result.unexpected_keys:
        raise UserError(f"{folder}: adapter tensors {result.unexpected_keys[:3]} do not fit adapter {name!r}")


# -- finding checkpoints ------------------------------------------------------------------------------
def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckdir = Path(run_dir) / CHECKPOINTS
    pointer = ckdir / "LATEST"
    if not pointer.exists():
        return None
    path = ckdir / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise UserError(f"{pointer}: names {path.name}, which is missing or incomplete")
    return path


def find_checkpoint(run_dir: str | os.PathLike, name: str | None) -> Path | None:
    """`--resume` (name None: the latest, or None if there is none) or `--resume step-000010` / a folder."""
    if name is None:
        return latest_checkpoint(run_dir)
    for path in (Path(name), Path(run_dir) / CHECKPOINTS / name):
        if (path / "state.json").is_file():
            return path
    raise UserError(f"--resume {name}: no checkpoint of that name (expected a folder holding state.json, "
                    f"e.g. {Path(run_dir) / CHECKPOINTS / 'step-000010'})")


# -- the train state ------------------------------------------------------------------------------------
class TrainState:
    """Adapters, heads, optimizer, scheduler and RNG of one run, saved together and restored exactly."""

    def __init__(self, base, adapters: list[str], optimizer: torch.optim.Optimizer, scheduler=None,
                 heads: dict[str, nn.Module] | None = None):
        self.base = base
        self.adapters = adapters
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.heads = heads or {}

    def save(self, run_dir: str | os.PathLike, step: int, extra: dict | None = None, keep: int = 2) -> Path:
        """Write checkpoint `step` atomically, point LATEST at it, then drop all but the newest `keep`."""
        opt_t, opt_meta = optimizer_tensors(self.optimizer)
        rng_t, rng_meta = rng_tensors()
        tensors = {**opt_t, **rng_t}
        for name, head in self.heads.items():
            tensors.update({f"head.{name}.{k}": v for k, v in head.state_dict().items()})
        state = {"step": step, "adapters": self.adapters, "optimizer": opt_meta, "rng": rng_meta,
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                 "extra": extra or {}}
        ckdir = Path(run_dir) / CHECKPOINTS
        final = ckdir / f"step-{step:06d}"
        with atomic_dir(final) as tmp:
            for name in self.adapters:
                self.base.save_adapter(name, tmp / "adapters" / name)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(tmp / "tensors.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
        atomic_write_text(ckdir / "LATEST", final.name)
        old = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and p != final)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def load(self, path: str | os.PathLike) -> tuple[int, dict]:
        """Restore everything from checkpoint `path`; returns (step, the recipe's extras)."""
        path = Path(path)
        tensors = load_file(str(path / "tensors.safetensors"))
        state = json.loads((path / "state.json").read_text())
        if sorted(state["adapters"]) != sorted(self.adapters):
            raise UserError(f"{path}: holds adapters {state['adapters']}, this run trains {self.adapters}")
        for name in self.adapters:
            load_adapter_weights(self.base, name, path / "adapters" / name)
        for name, head in self.heads.items():
            prefix = f"head.{name}."
            head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        load_optimizer_tensors(self.optimizer, tensors, state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(tensors, state["rng"])
        return state["step"], state.get("extra", {})
