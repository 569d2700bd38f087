"""An adapter is verified before it is trusted: one check for every user (recipes' init_adapter,
reward models, `align serve`, `align export`).

Before any weight is loaded into a model:
- adapter_config.json parses, is an object, and has a positive `r`, a positive `lora_alpha` and
  usable `target_modules`;
- adapter_model.safetensors has a readable header whose data offsets fit the file (not truncated);
- it holds exactly the LoRA tensors the config implies for this base: PEFT's names
  ("base_model.model.<module>.lora_A.weight" (r, in) / ".lora_B.weight" (out, r)) for each base
  linear the config targets; missing, unexpected and wrongly shaped tensors are named;
- align_meta.json's base_fingerprint, when there is one, matches the base (a warning when there is none);
- every floating-point tensor is finite: a NaN or inf weight makes every log-prob NaN (a policy that trains
  on nothing, a reference that poisons each loss, a server that samples garbage).

PEFT itself only warns about missing or unexpected names and starts those layers from random or
zero weights, so without this a wrong adapter trains (and anchors the reference) from a half-random start.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from align.core.adapter_files import PEFT_PREFIX
from align.core.errors import UserError

CONFIG, WEIGHTS, META = "adapter_config.json", "adapter_model.safetensors", "align_meta.json"
HEADER_LIMIT = 8 << 20  # a safetensors header of 8 MiB lists ~50,000 tensors
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
LORA_PARTS = (".lora_A.weight", ".lora_B.weight")
SHOWN = 3  # names listed in one message


class AdapterInvalid(UserError):
    """An adapter folder that must not be loaded: the message names the file and what is wrong."""


def short(value: object, limit: int = 120) -> str:
    """repr() cut to `limit` characters: error messages must not echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# -- reading the files -----------------------------------------------------------------------------
def json_object(data: bytes, where: Path) -> dict:
    """A JSON object from bytes; AdapterInvalid naming the file (and line) when it is not one."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterInvalid(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise AdapterInvalid(f"{where}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # huge integers, nesting deeper than Python recurses
        raise AdapterInvalid(f"{where}: not usable JSON ({type(e).__name__}: {short(str(e), 80)})") from None
    if not isinstance(value, dict):
        raise AdapterInvalid(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def header_shapes(read_at: Callable[[int, int], bytes], size: int, where: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file of `size` bytes read by `read_at(offset, n)`,
    every entry checked against the file's size (a truncated file or cut header is named)."""
    head = read_at(0, 8)
    if len(head) < 8:
        raise AdapterInvalid(f"{where}: {size} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > HEADER_LIMIT or n > size - 8:
        raise AdapterInvalid(f"{where}: safetensors header length {n} does not fit the file "
                             f"({size} bytes; headers over {HEADER_LIMIT} bytes are refused)")
    header = json_object(read_at(8, n), where)
    data_size = size - 8 - n
    return {key: _tensor_shape(where, key, entry, data_size) for key, entry in header.items() if key != "__metadata__"}


def _tensor_shape(where: Path, key: str, entry: object, data_size: int) -> list[int]:
    def ints(v, n=None):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))

    if not isinstance(entry, dict) or not ints(entry.get("shape")) or not ints(entry.get("data_offsets"), 2):
        raise AdapterInvalid(f"{where}: tensor {short(key)}: expected dtype, shape and data_offsets")
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    item = DTYPE_SIZES.get(entry.get("dtype"))
    if item is None or not begin <= end <= data_size or end - begin != math.prod(shape) * item:
        raise AdapterInvalid(f"{where}: tensor {short(key)}: dtype {short(entry.get('dtype'))}, shape "
                             f"{short(shape)} and data_offsets {[begin, end]} do not fit the file "
                             f"({data_size} data bytes; truncated?)")
    return shape


def read_header(path: Path) -> dict[str, list[int]]:
    """header_shapes of the file at `path` (a trusted local path: recipes, reward models)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def read_at(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        return header_shapes(read_at, size, path)


# -- the config ------------------------------------------------------------------------------------
def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_config(config: dict, where: Path) -> None:
    """The fields the tensors are checked against: r, lora_alpha, target_modules, rank_pattern."""
    if not _positive_int(config.get("r")):
        raise AdapterInvalid(f"{where}: field 'r': expected a positive integer, got {short(config.get('r'))}")
    if "lora_alpha" in config and not _positive_number(config["lora_alpha"]):
        raise AdapterInvalid(f"{where}: field 'lora_alpha': expected a positive number, "
                             f"got {short(config['lora_alpha'])}")
    targets = config.get("target_modules")
    strings = isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    if not (isinstance(targets, str) and targets) and not strings and not config.get("target_parameters"):
        raise AdapterInvalid(f"{where}: field 'target_modules': expected a module name regex or a non-empty "
                             f"list of module names, got {short(targets)}")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise AdapterInvalid(f"{where}: field 'target_modules': not a valid regex ({e})") from None
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        check = _positive_int if field == "rank_pattern" else _positive_number
        if not isinstance(pattern, dict) or not all(check(v) for v in pattern.values()):
            raise AdapterInvalid(f"{where}: field {field!r}: expected module -> positive number")


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    config = json_object(path.read_bytes(), path)
    check_config(config, path)
    return config


# -- the tensors the config implies ----------------------------------------------------------------
def _targeted(config: dict, module: str) -> bool:
    """Whether PEFT puts a LoRA layer on `module` (its check_target_module_exists, for plain linears)."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, module):
        return False
    if isinstance(exclude, list) and any(module == e or module.endswith("." + e) for e in exclude):
        return False
    if targets == "all-linear":
        return module.rpartition(".")[2] != "lm_head"
    if isinstance(targets, str):
        found = re.fullmatch(targets, module) is not None
    else:
        found = any(module == t or module.endswith("." + t) for t in targets or [])
    layers = config.get("layers_to_transform")
    if found and layers is not None:
        index = re.search(r"\.(\d+)\.", f".{module}.")
        wanted = [layers] if isinstance(layers, int) else layers
        found = index is not None and int(index.group(1)) in wanted
    return found


def _rank(config: dict, module: str) -> int:
    for key, r in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return r
    return config["r"]


def expected_tensors(config: dict, modules: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """PEFT's tensor name -> shape for each base linear `module` -> (out, in) the config targets."""
    out = {}
    for module, (out_dim, in_dim) in modules.items():
        if _targeted(config, module):
            r = _rank(config, module)
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (r, in_dim)
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (out_dim, r)
    return out


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_tensors(config: dict, shapes: Mapping[str, list[int]], modules: Mapping[str, tuple[int, int]],
                  where: Path, base_label: str) -> None:
    """Exactly the LoRA tensors `config` implies on the base `modules`: missing, unexpected, misshapen named."""
    expected = expected_tensors(config, modules)
    # Tensors PEFT saves besides the LoRA pairs (modules_to_save copies, target_parameters' experts,
    # embeddings) are not derived here; the LoRA pairs of plain linears are.
    lora = {k: v for k, v in shapes.items() if k.endswith(LORA_PARTS)}
    skipped = _parameter_modules(config, lora, modules)
    missing = sorted(k for k in expected if k not in lora)
    extra = sorted(k for k in lora if k not in expected and k not in skipped)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) that {CONFIG} implies on {base_label}: {_listed(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), not LoRA layers {CONFIG} targets on {base_label}: "
                        f"{_listed(extra)}")
    if problems:
        raise AdapterInvalid(f"{where}: " + "; ".join(problems))
    wrong = [f"{k} is {list(lora[k])}, expected {list(s)}" for k, s in sorted(expected.items())
             if tuple(lora[k]) != tuple(s)]
    if wrong:
        raise AdapterInvalid(f"{where}: {len(wrong)} tensor(s) of the wrong shape, so the adapter does not fit "
                             f"{base_label} with {CONFIG}'s r={config['r']}: {_listed(wrong)}")


def _parameter_modules(config: dict, lora: Mapping, modules: Mapping) -> set[str]:
    """LoRA keys on modules that are no base linear, when the config targets parameters (MoE experts)."""
    if not config.get("target_parameters"):
        return set()
    return {k for k in lora if k.removeprefix(PEFT_PREFIX).rsplit(".", 3)[0] not in modules}


# -- the base --------------------------------------------------------------------------------------
def model_linears(model) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) for each linear of a loaded (maybe PEFT-wrapped) plain model."""
    out = {}
    for name, m in model.named_modules():
        if "lora_" in name or ".base_layer" in name or name.endswith("base_layer"):
            continue
        layer = getattr(m, "base_layer", m)
        # nn.Linear (bitsandbytes' 4-bit too) and transformers' Conv1D (nf/nx) carry both sizes.
        dims = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
        if dims[0] is None and hasattr(layer, "nf") and hasattr(layer, "nx"):
            dims = (layer.nf, layer.nx)
        if isinstance(dims[0], int) and isinstance(dims[1], int):
            out[name] = dims
    return out


def header_linears(shapes: Mapping[str, list[int]]) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) from a base folder's weight shapes (2-D "<module>.weight" as (out, in))."""
    return {k[: -len(".weight")]: (v[0], v[1]) for k, v in shapes.items() if k.endswith(".weight") and len(v) == 2}


def check_meta(meta: dict, where: Path) -> None:
    """align_meta.json's base_fingerprint, when present, is an object (compared by check_fingerprint)."""
    saved = meta.get("base_fingerprint")
    if saved is not None and not isinstance(saved, dict):
        raise AdapterInvalid(f"{where}: field 'base_fingerprint': expected an object, got {short(saved)}")


def check_fingerprint(meta: dict | None, mine: Mapping, folder: Path, base_label: str) -> None:
    """align_meta.json's base_fingerprint against the base's; a one-line warning when there is none."""
    saved = (meta or {}).get("base_fingerprint")
    if saved is None:
        warnings.warn(f"{folder}: no {META} base_fingerprint; cannot check that this adapter was trained on "
                      f"{base_label} (only its tensor shapes were checked)", stacklevel=3)
        return
    for key, value in mine.items():
        if key in saved and value is not None and saved[key] != value:
            raise AdapterInvalid(f"{folder}: trained on another base: {META} base_fingerprint.{key} is "
                                 f"{short(saved[key])}, {base_label} has {value!r}")


# -- the whole check -------------------------------------------------------------------------------
class AdapterFiles:
    """An adapter folder whose files were read and checked: config, tensor shapes, align_meta.json (or None)."""

    def __init__(self, folder: Path, config: dict, shapes: dict[str, list[int]], meta: dict | None):
        self.folder, self.config, self.shapes, self.meta = folder, config, shapes, meta


def read_adapter_files(folder: str | os.PathLike) -> AdapterFiles:
    """The checks that need no model: the config's fields, a whole safetensors file, align_meta.json parses."""
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise AdapterInvalid(f"{folder}: no {name}; expected a PEFT adapter folder (safetensors weights)")
    config = read_config(folder)
    shapes = read_header(folder / WEIGHTS)
    if not any(k.endswith(LORA_PARTS) for k in shapes):
        raise AdapterInvalid(f"{folder / WEIGHTS}: no LoRA tensors (*.lora_A.weight / *.lora_B.weight)")
    meta = None
    if (folder / META).is_file():
        meta = json_object((folder / META).read_bytes(), folder / META)
        check_meta(meta, folder / META)
    return AdapterFiles(folder, config, shapes, meta)


def verify_adapter(folder: str | os.PathLike, modules: Mapping[str, tuple[int, int]], fingerprint: Mapping | None,
                   base_label: str) -> AdapterFiles:
    """Every check before `folder` is loaded onto a base whose linears are `modules` (name -> (out, in))
    and whose fingerprint is `fingerprint` (None: not checked). AdapterInvalid: one line naming the file."""
    files = read_adapter_files(folder)
    if fingerprint is not None:
        check_fingerprint(files.meta, fingerprint, files.folder, base_label)
    check_tensors(files.config, files.shapes, modules, files.folder / WEIGHTS, base_label)
    check_finite(files.folder / WEIGHTS)
    return files


def check_finite(path: Path, shown: Path | None = None) -> None:
    """AdapterInvalid naming the first tensor of `path` (a whole safetensors file) with a NaN or inf value;
    the message names `shown` instead of `path` when given (a server reads its private copy)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise AdapterInvalid(f"{shown or path}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf); "
                                     f"expected finite weights")

