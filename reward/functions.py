"""Programmatic rewards called the TRL way, with every bad result reported as one line.

A reward function is what TRL's GRPOTrainer takes in `reward_funcs`, called by keyword:

    fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)

`columns` are the dataset's columns other than "prompt", "completion" and "completion_ids"
(TRL's exclusions), one value per row, e.g. `answer` or `solution`. Completions are strings for
string prompts and `[{"role": "assistant", "content": text}]` for conversational ones. The
function returns one float per row, or None for a row it has no opinion on (NaN here, as in
TRL). TRL also passes `trainer_state`, `log_extra` and `log_metric`; callers that have such
things pass them as `extras`, so functions should take `**kwargs`.

Our own bookkeeping never reaches a function: callers pass dataset columns only, and where a
row came from (a JSONL "file:line") goes in `places`, used in error messages alone.

Specs in a config: a built-in name (`arithmetic`, `format`, `length_penalty(limit=16)`,
reward/builtin.py), a dotted path `my_lib.rewards.correct` (or the older `my_lib.rewards:correct`),
or, in Python, the callable itself.

    rf = RewardFunctions(["arithmetic", "my_lib.rewards.correct"], [1.0, 0.5])
    per_func = rf.score(prompts, completions, completion_ids, {"answer": answers})  # (B, F), NaN = None
    total = (per_func * rf.weights).nansum(1)
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

import torch

from align.core.errors import UserError
from reward.builtin import REGISTRY, as_text  # noqa: F401 - as_text is part of this module's interface

# TRL never passes these as columns: they are the call's own arguments.
NOT_COLUMNS = ("prompt", "completion", "completion_ids")
_CALL_ARGS = ("prompts", "completions", "completion_ids")


class RewardError(UserError, ValueError):
    """A reward function that cannot be found, raised on a row, or returned a bad value."""


# -- lookup ---------------------------------------------------------------------------------------

_BUILTIN_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)


def _parse_kwargs(spec: str, body: str) -> dict:
    """`limit=16, per_char=0.05` -> {"limit": 16, "per_char": 0.05}: literals only, nothing is executed."""
    try:
        call = ast.parse(f"f({body})", mode="eval").body
        if call.args:
            raise ValueError("positional arguments")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise RewardError(f"reward {spec!r}: expected name(key=literal, ...), e.g. "
                          f"'length_penalty(limit=16)': {e}") from None


def _builtin(spec: str) -> Callable | None:
    """A built-in by name, its arguments bound (a partial, named like TRL names it); None if not one."""
    name, kwargs = spec, {}
    m = _BUILTIN_CALL.match(spec)
    if m:
        name, kwargs = m.group(1), _parse_kwargs(spec, m.group(2))
    if name not in REGISTRY:
        return None
    fn = REGISTRY[name]
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise RewardError(f"reward {spec!r}: unknown argument(s) {unknown}; {name} takes {allowed or 'none'}")
    return functools.partial(fn, **kwargs) if kwargs else fn


def _import_attr(spec: str, module_name: str, attrs: list[str]):
    obj = importlib.import_module(module_name)
    for k, part in enumerate(attrs):
        if not hasattr(obj, part):
            raise RewardError(f"reward {spec!r}: {'.'.join([module_name, *attrs[:k]])!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _import_dotted(spec: str):
    """`pkg.mod.fn` or `pkg.mod.Class.method`: the longest importable module prefix, then attributes."""
    if ":" in spec:  # the older "module:function" form names the split itself
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise RewardError(f"reward {spec!r}: expected 'module.function' or 'module:function'")
        splits = [(module_name, attr.split("."))]
    else:
        parts = spec.split(".")
        if len(parts) < 2 or not all(parts):
            raise RewardError(f"reward {spec!r}: unknown name; expected one of {sorted(REGISTRY)} "
                              f"or a dotted path 'module.function' for your own")
        splits = [(".".join(parts[:k]), parts[k:]) for k in range(len(parts) - 1, 0, -1)]
    first_error = None
    for module_name, attrs in splits:
        try:
            return _import_attr(spec, module_name, attrs)
        except ModuleNotFoundError as e:
            # Only "this prefix is not a module" means try a shorter one; a module that fails inside is reported.
            if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
                raise RewardError(f"reward {spec!r}: importing {module_name!r} failed: {e}") from None
            first_error = first_error or e
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - an error inside the user's module, reported in one line
            raise RewardError(f"reward {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    raise RewardError(f"reward {spec!r}: cannot import module {splits[-1][0]!r} ({first_error}); "
                      f"is it on PYTHONPATH?")


# `trl grpo`'s own reward names (trl/scripts/grpo.py), read from TRL when it is installed.
TRL_BUILTINS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward")


def _trl_builtin(spec: str) -> Callable:
    try:
        import trl.rewards
    except ImportError:
        raise RewardError(f"reward {spec!r}: TRL's built-in reward; install TRL (pip install trl) to use it, "
                          f"or give your own by dotted path") from None
    return getattr(trl.rewards, spec)


def load_reward_func(spec: str | Callable) -> Callable:
    """A callable as is; a built-in name (optionally `name(key=literal, ...)`); or a user's function
    by dotted path `pkg.mod.fn` (also `pkg.mod.Class.method` and the older `pkg.mod:fn`)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward: expected a name from {sorted(REGISTRY)}, a dotted path 'module.function' "
                          f"or a function, got {spec!r}")
    spec = spec.strip()
    fn = _builtin(spec) if ":" not in spec else None
    if fn is None and spec in TRL_BUILTINS:
        fn = _trl_builtin(spec)
    if fn is None:
        if os.getcwd() not in sys.path:  # as `trl grpo` does: my_rewards.py beside the config imports
            sys.path.insert(0, os.getcwd())
        fn = _import_dotted(spec)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: is a {type(fn).__name__}, expected a function "
                          f"(prompts, completions, completion_ids, **columns) -> list of floats")
    return fn


def reward_func_name(fn: Callable) -> str:
    """TRL's name for a reward function (its metrics key): __name__, a partial's wrapped function's
    name, a callable object's class name."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


# -- one call, checked ----------------------------------------------------------------------------


def _where(i: int, prompts, completions, places) -> str:
    place = f" at {places[i]}" if places is not None and places[i] is not None else ""
    return (f"row {i}{place} (prompt {_short(prompts[i])!r}, completion {_short(completions[i])!r})")


def _short(x) -> str:
    try:
        text = as_text(x)
    except TypeError:
        text = str(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_inputs(name: str, prompts, completions, completion_ids, columns, places) -> None:
    n = len(completions)
    sizes = {"prompts": len(prompts), "completion_ids": len(completion_ids),
             **{f"column {k!r}": len(v) for k, v in columns.items()}}
    if places is not None:
        sizes["places"] = len(places)
    bad = {k: v for k, v in sizes.items() if v != n}
    if bad:
        raise RewardError(f"reward {name}: {n} completions but {bad}; expected one value per row")
    clash = sorted(set(columns) & set(_CALL_ARGS))
    if clash:
        raise RewardError(f"reward {name}: column(s) {clash} clash with the call's own arguments; rename them")


def _missing_columns(fn: Callable, given: set[str]) -> list[str]:
    """Required parameters the call will not supply (a missing column), where the signature says so."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty and p.name not in given
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _find_failing_row(fn, name, prompts, completions, completion_ids, columns, extras, places, batch_error):
    """The batch call raised: call row by row and report the first row that fails alone."""
    for i in range(len(completions)):
        try:
            fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1], completion_ids=completion_ids[i:i + 1],
               **{k: v[i:i + 1] for k, v in columns.items()}, **extras)
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported by row
            return RewardError(f"reward {name} failed on {_where(i, prompts, completions, places)}: "
                               f"{type(e).__name__}: {e}")
    return RewardError(f"reward {name} failed on the batch of {len(completions)} rows (no single row fails "
                       f"alone): {type(batch_error).__name__}: {batch_error}")


def _as_values(name: str, out, n: int) -> list:
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
        raise RewardError(f"reward {name}: returned {type(out).__name__}, expected a list of {n} floats (or None)")
    values = [v.item() if hasattr(v, "item") else v for v in out]
    if len(values) != n:
        raise RewardError(f"reward {name}: returned {len(values)} values for {n} rows; expected one per row")
    return values


def call_reward_func(fn: Callable, prompts: Sequence, completions: Sequence, completion_ids: Sequence,
                     columns: dict[str, Sequence], *, extras: dict | None = None,
                     places: Sequence | None = None, name: str | None = None) -> list[float]:
    """Call `fn` by keyword as TRL does and check what it returned: one finite float or None per row.

    columns: dataset columns only (keys in NOT_COLUMNS are dropped, as TRL drops them). extras:
    non-column keywords (TRL's trainer_state, log_metric...). places: where each row came from,
    named in errors only. Returns floats with NaN for None. A function that raises is re-run row by
    row; the RewardError names the function, the row (and its place) and the original error.
    """
    name = name or reward_func_name(fn)
    columns = {k: list(v) for k, v in columns.items() if k not in NOT_COLUMNS}
    extras = dict(extras or {})
    prompts, completions, completion_ids = list(prompts), list(completions), [list(c) for c in completion_ids]
    _check_inputs(name, prompts, completions, completion_ids, columns, places)
    missing = _missing_columns(fn, {*_CALL_ARGS, *columns, *extras})
    if missing:
        raise RewardError(f"reward {name}: needs column(s) {missing}, the data has {sorted(columns) or 'none'}")
    try:
        out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, **extras)
    except RewardError:
        raise
    except Exception as batch_error:  # noqa: BLE001 - any failure of user code is reported by row
        raise _find_failing_row(fn, name, prompts, completions, completion_ids, columns, extras, places,
                                batch_error) from batch_error
    values = []
    for i, v in enumerate(_as_values(name, out, len(completions))):
        if v is None:
            values.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RewardError(f"reward {name} returned {v!r} ({type(v).__name__}) on "
                              f"{_where(i, prompts, completions, places)}; expected a float or None")
        if not math.isfinite(v):
            raise RewardError(f"reward {name} returned {v} on {_where(i, prompts, completions, places)}; "
                              f"expected a finite number (None for no opinion)")
        values.append(float(v))
    return values


# -- several, weighted ----------------------------------------------------------------------------


def _weights(weights, n: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(n)
    weights = list(weights)
    if len(weights) != n:
        raise RewardError(f"reward_weights: {len(weights)} weights for {n} reward functions; expected one each")
    for k, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise RewardError(f"reward_weights: item {k} is {w!r}; expected a finite number")
    return torch.tensor([float(w) for w in weights])


def _unique(names: list[str]) -> list[str]:
    """The same reward twice keeps both, under distinct names: name, name#1, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 0
        out.append(name)
    return out


def _spec_name(spec, fn) -> str:
    """A built-in keeps the name the config gave it ("format", not "answer_format"); others TRL's name."""
    if isinstance(spec, str):
        m = _BUILTIN_CALL.match(spec)
        base = m.group(1) if m else spec.strip()
        if base in REGISTRY:
            return base
    return reward_func_name(fn)


class RewardFunctions:
    """Several reward functions and their weights; `score` gives each one's rewards apart, (B, F).

    Combining them is the caller's: TRL's rule is `(per_func * weights).nansum(1)`, so a None
    counts as 0 in the sum, and `rows_without_reward` names rows no function scored.
    """

    def __init__(self, funcs: list[str | Callable], weights: list[float] | None = None):
        if not funcs:
            raise RewardError("reward_functions: expected at least one reward function")
        self.funcs = [load_reward_func(s) for s in funcs]
        self.names = _unique([_spec_name(s, f) for s, f in zip(funcs, self.funcs, strict=True)])
        self.weights = _weights(weights, len(self.funcs))

    def score(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence,
              columns: dict[str, Sequence], *, extras: dict | None = None,
              places: Sequence | None = None) -> torch.Tensor:
        """(B, F) float32 rewards, one column per function in order, NaN where it returned None."""
        cols = [call_reward_func(fn, prompts, completions, completion_ids, columns, extras=extras,
                                 places=places, name=name) for fn, name in zip(self.funcs, self.names, strict=True)]
        return torch.tensor(cols, dtype=torch.float32).reshape(len(cols), len(completions)).T.contiguous()


def rows_without_reward(per_func: torch.Tensor) -> list[int]:
    """Indices of rows where every function returned None (all NaN): TRL warns about these."""
    return torch.isnan(per_func).all(dim=1).nonzero().flatten().tolist()
