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

state.json lists the sha256 of every other file ("files"). A checkpoint counts as good only
when every listed file is there with its checksum and every tensor is finite; resume takes
the newest good one and says which it skipped and why (docs/design.md, "The run skeleton").
Non-finite tensors are never written: `save` refuses them as a last line of defence.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from align.core.atomic import atomic_dir, atomic_write_text, sweep_stale_temps
from align.core.errors import TrainingDiverged, UserError
from align.core.fsdp import full_tensor, load_full_adapter, shard_optimizer_state

CHECKPOINTS = "checkpoints"
# What LATEST may name: a checkpoint folder inside checkpoints/, nothing else.
CHECKPOINT_NAME = re.compile(r"step-\d{6,}")


class CheckpointError(UserError):
    """A checkpoint that is incomplete, damaged or non-finite; the message names the file."""


# -- pieces -----------------------------------------------------------------------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict, dict]:
    """Flatten an optimizer's state into named tensors plus JSON-able hyper-parameters.

    Under FSDP the moments of sharded parameters are gathered whole: every process must call this.
    """
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            t = full_tensor(v) if torch.is_tensor(v) else torch.tensor(v)
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

    weights = load_tensors(Path(folder) / "adapter_model.safetensors")
    if base.sharded:  # FSDP: each process copies in its slice
        return load_full_adapter(base, name, weights, folder)
    result = set_peft_model_state_dict(base.peft, weights, adapter_name=name)
    if result.unexpected_keys:
        raise UserError(f"{folder}: adapter tensors {result.unexpected_keys[:3]} do not fit adapter {name!r}")


# -- checksums and verification -----------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but state.json, by path relative to it."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "state.json"}


def nonfinite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, t in tensors.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def damaged(tensors: dict) -> list[str]:
    """Tensors no healthy run holds: NaN or infinity anywhere, or a negative Adam second moment."""
    return nonfinite(tensors) or [k for k, t in tensors.items() if k.endswith(".exp_avg_sq") and bool((t < 0).any())]


def adam_bound(beta1: float, beta2: float) -> float:
    """Largest |exp_avg| / sqrt(exp_avg_sq) Adam can reach from any gradients (Cauchy-Schwarz over the sums)."""
    if beta1 * beta1 >= beta2:
        return float("inf")
    return (1 - beta1) / ((1 - beta2) * (1 - beta1 * beta1 / beta2)) ** 0.5


def inconsistent_moments(state: dict, param_groups: list[dict], prefix: str = "optim") -> list[str]:
    """Parameters whose Adam moments no sequence of gradients could produce: a corrupted optimizer state.

    `state` maps "<prefix>.<pid>.<name>" to tensors (a checkpoint's) or pid -> {name: tensor} (a live one).
    """
    betas = {pid: g.get("betas", (0.9, 0.999)) for g in param_groups for pid in g.get("params", [])}
    if state and all(isinstance(k, str) for k in state):
        live: dict = {}
        for key, t in state.items():
            if key.startswith(prefix + "."):
                _, pid, name = key.split(".", 2)
                live.setdefault(int(pid), {})[name] = t
        state = live
    bad = []
    for pid, st in state.items():
        m, v = st.get("exp_avg"), st.get("exp_avg_sq")
        if not (torch.is_tensor(m) and torch.is_tensor(v)) or pid not in betas:
            continue
        bound = adam_bound(*betas[pid]) * 1.01  # rounding headroom
        # Moments below 1e-12 move a weight by at most ~1e-4 * lr (eps = 1e-8): not worth a false alarm.
        if bool((m.abs() > bound * v.clamp(min=0).sqrt() + 1e-12).any()):
            bad.append(f"{prefix}.{pid}")
    return bad


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path / 'state.json'}: missing (the checkpoint is incomplete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'state.json'}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'state.json'}: expected a mapping with an integer 'step'")
    return state


def load_tensors(path: Path) -> dict:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check `path` completely (files, checksums, finite tensors); returns its state or raises CheckpointError."""
    path = Path(path)
    state = read_state(path)
    missing = [k for k in ("adapters", "optimizer", "rng") if k not in state]
    if missing or not isinstance(state["adapters"], list) or not all(
            isinstance(a, str) and re.fullmatch(r"\w[\w.-]*", a) for a in state["adapters"]):
        raise CheckpointError(f"{path / 'state.json'}: lacks {missing or 'a list of adapters'} (not a checkpoint "
                              f"of this kind, or damaged)")
    listed = state.get("files")
    if listed is None:  # written before checksums were recorded: check what can be checked
        listed = {p.relative_to(path).as_posix(): None for p in path.rglob("*.safetensors")}
    if not isinstance(listed, dict) or any(Path(k).is_absolute() or ".." in Path(k).parts for k in listed):
        raise CheckpointError(f"{path / 'state.json'}: 'files' must map paths inside the checkpoint to checksums")
    needed = ["tensors.safetensors"] + [f"adapters/{a}/adapter_model.safetensors" for a in state["adapters"]]
    for rel in needed:  # a list that leaves a file out does not get it past the check
        listed.setdefault(rel, None)
    for rel, digest in sorted(listed.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the checkpoint is incomplete)")
        if digest is not None and sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (the file was changed or damaged after it was written)")
        if rel.endswith(".safetensors"):
            tensors = load_tensors(f)
            bad = damaged(tensors)
            if bad:
                what = "a negative second moment" if bad[0].endswith(".exp_avg_sq") and not nonfinite(
                    {bad[0]: tensors[bad[0]]}) else "NaN or infinity"
                raise CheckpointError(f"{f}: tensor {bad[0]} holds {what} "
                                      f"({len(bad)} such tensors)")
            groups = (state.get("optimizer") or {}).get("param_groups") or []
            bad = inconsistent_moments(tensors, groups) if rel == "tensors.safetensors" else []
            if bad:
                raise CheckpointError(f"{f}: the optimizer moments of {bad[0]} are beyond what any gradients give "
                                      f"(|exp_avg| > bound * sqrt(exp_avg_sq)): a corrupted optimizer state")
    return state


# -- finding checkpoints ------------------------------------------------------------------------------
def _named_by_latest(ckdir: Path, say) -> Path | None:
    pointer = ckdir / "LATEST"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not CHECKPOINT_NAME.fullmatch(name):
        say(f"{pointer}: {name[:80]!r} is not a checkpoint name of this run (step-NNNNNN); ignored, "
            f"looking for checkpoints instead")
        return None
    return ckdir / name


def latest_checkpoint(run_dir: str | os.PathLike, say=print) -> Path | None:
    """The newest good checkpoint of the run: LATEST's if it verifies, else the newest that does.

    Each one skipped is reported through `say`, with the file that is wrong. None when the run has
    none at all; a CheckpointError when it has some but none is good.
    """
    ckdir = Path(run_dir) / CHECKPOINTS
    if not ckdir.is_dir():
        return None
    first = _named_by_latest(ckdir, say)
    found = sorted((p for p in ckdir.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)), reverse=True)
    candidates = ([first] if first is not None else []) + [p for p in found if p != first]
    problems = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            say(f"[align] skipping checkpoint {path.name}: {e}")
            continue
        if problems:
            say(f"[align] falling back to checkpoint {path.name}, the newest good one")
        return path
    if problems:
        raise CheckpointError(f"{ckdir}: no good checkpoint to resume from ({problems[0]}); pass --overwrite "
                              f"to start over")
    return None


def find_checkpoint(run_dir: str | os.PathLike, name: str | None) -> Path | None:
    """`--resume` (name None: the latest good one, or None if there is none) or `--resume step-000010` / a folder."""
    if name is None:
        return latest_checkpoint(run_dir)
    for path in (Path(name), Path(run_dir) / CHECKPOINTS / name):
        if (path / "state.json").is_file():
            verify_checkpoint(path)  # asked for by name: a damaged one is an error, not a fallback
            return path
    raise UserError(f"--resume {name}: no checkpoint of that name (expected a folder holding state.json, "
                    f"e.g. {Path(run_dir) / CHECKPOINTS / 'step-000010'})")


def sweep_run_temps(run_dir: str | os.PathLike) -> list[str]:
    """Remove half-written temporaries (killed atomic writes) from the run folder and its checkpoints."""
    run_dir = Path(run_dir)
    removed = sweep_stale_temps(run_dir) + sweep_stale_temps(run_dir / CHECKPOINTS)
    ckdir = run_dir / CHECKPOINTS
    if ckdir.is_dir():
        for p in ckdir.glob("step-*/adapters"):
            removed += sweep_stale_temps(p)
    return removed


# -- the train state ------------------------------------------------------------------------------------
class TrainState:
    """Adapters, heads, optimizer, scheduler and RNG of one run, saved together and restored exactly."""

    def __init__(self, base, adapters: list[str], optimizer: torch.optim.Optimizer, scheduler=None,
                 heads: dict[str, nn.Module] | None = None, record: dict | None = None):
        """`record`: what else state.json keeps (the run's resolved config and process count, compared on resume)."""
        self.base = base
        self.adapters = adapters
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.heads = heads or {}
        self.record = record or {}

    def save(self, run_dir: str | os.PathLike, step: int, extra: dict | None = None, keep: int = 2,
             optim: tuple[dict, dict] | None = None) -> Path:
        """Write checkpoint `step` atomically and verify it, point LATEST at it, then drop all but the newest `keep`.

        Non-finite tensors are refused before anything is written (TrainingDiverged). `optim`: the
        optimizer's tensors already gathered by every process (FSDP), else they are read here.
        """
        opt_t, opt_meta = optim or optimizer_tensors(self.optimizer)
        rng_t, rng_meta = rng_tensors()
        tensors = {**opt_t, **rng_t}
        for name, head in self.heads.items():
            tensors.update({f"head.{name}.{k}": v for k, v in head.state_dict().items()})
        trained = {f"adapter.{a}.{n}": p for a in self.adapters
                   for n, p in (self.base.gathered.get(a) or self.base.adapter_parameters(a)).items()}
        bad = nonfinite({**trained, **tensors})
        if bad:
            raise TrainingDiverged(f"step {step}: {bad[0]} holds NaN or infinity ({len(bad)} such tensors); "
                                   f"checkpoint not written")
        state = {"step": step, "adapters": self.adapters, "optimizer": opt_meta, "rng": rng_meta,
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                 "extra": extra or {}, **self.record}
        ckdir = Path(run_dir) / CHECKPOINTS
        final = ckdir / f"step-{step:06d}"
        with atomic_dir(final) as tmp:
            for name in self.adapters:
                self.base.save_adapter(name, tmp / "adapters" / name)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(tmp / "tensors.safetensors"))
            state["files"] = file_checksums(tmp)
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
        verify_checkpoint(final)  # read back: only a checkpoint known good may replace older ones
        atomic_write_text(ckdir / "LATEST", final.name)
        old = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and p != final)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def load(self, path: str | os.PathLike) -> tuple[int, dict]:
        """Restore everything from checkpoint `path`; returns (step, the recipe's extras)."""
        path = Path(path)
        state = read_state(path)
        tensors = load_tensors(path / "tensors.safetensors")
        bad = damaged(tensors)
        if bad:
            raise CheckpointError(f"{path / 'tensors.safetensors'}: tensor {bad[0]} holds NaN, infinity or a "
                                  f"negative second moment: a corrupted optimizer state")
        if sorted(state.get("adapters") or []) != sorted(self.adapters):
            raise UserError(f"{path}: holds adapters {state.get('adapters')}, this run trains {self.adapters}")
        try:
            for name in self.adapters:
                load_adapter_weights(self.base, name, path / "adapters" / name)
            for name, head in self.heads.items():
                prefix = f"head.{name}."
                head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            load_optimizer_tensors(self.optimizer, tensors, state["optimizer"])
            if self.base.sharded:
                shard_optimizer_state(self.optimizer)
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            restore_rng(tensors, state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            # Checksums matched, so the files are as written; they do not fit this run's model or optimizer.
            raise CheckpointError(f"{path}: does not fit this run ({type(e).__name__}: {str(e)[:200]})") from None
        return state["step"], state.get("extra", {})
