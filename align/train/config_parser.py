"""YAML configs and command-line flags that mirror config dataclasses exactly.

An unknown key, a wrong type or a failed cross-field check is an error that
names the file, the line and the key. Overrides (`--learning_rate 1e-5` or
`--set learning_rate=1e-5`) go through the same checks. A key that was renamed
(a config class's `RENAMED`) is an error that names its new spelling. A key of TRL's CLI that
is not a field is mapped, noted in one printed line, or refused (align/train/trl_keys.py). All
the unknown, renamed and refused keys and wrong types of one config are reported in one message.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from align.core.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that does not match its dataclass."""


MAX_YAML_VALUES = 100_000  # a config is a few hundred values; anchors and aliases can make billions


def _key_lines(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every (dotted) key.

    The composed nodes are walked first, as loading would expand them: a key given twice in one mapping
    (YAML silently keeps the last) and more than MAX_YAML_VALUES values (an alias bomb, which would hang
    the loader and everything after it) are ConfigErrors naming the file and line."""
    text = path.read_text(encoding="utf-8-sig")
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[str, int] = {}
    stack, seen = ([(node, "")] if node is not None else []), 0
    while stack:
        n, prefix = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{path}:{n.start_mark.line + 1}: expands to more than {MAX_YAML_VALUES} values "
                              f"(anchors and aliases); expected a config of plain keys")
        if isinstance(n, yaml.SequenceNode):
            stack.extend((v, prefix) for v in n.value)
        elif isinstance(n, yaml.MappingNode):
            here: dict[str, int] = {}
            for k, v in n.value:
                key, line = f"{prefix}{k.value}", k.start_mark.line + 1
                if key in here:
                    raise ConfigError(f"{path}:{line}: {key}: given twice (first at line {here[key]}); YAML would "
                                      f"keep only this one")
                here[key] = lines[key] = line
                stack.append((v, key + "."))
    data = yaml.safe_load(text)
    return ({} if data is None else data), lines


def arg(default, help: str, **kw):
    """A config field with help text (shown by `align <recipe> --help`); lists and dicts are copied per instance."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Check `value` against annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in typing.get_args(tp))}, "
                          f"got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp is typing.Any:
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and typing.get_args(tp)[:1] == (str,):
            value = [value]  # `--report_to tensorboard` means [tensorboard]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arm,) = typing.get_args(tp)[:1] or (typing.Any,)
        return [_coerce(v, arm, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return value  # built by _build
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads 1e-4 (no dot) as a string; accept it as the number it plainly is.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool) and tp is not bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, source: str, lines: dict[str, int], prefix: str = "") -> T:
    """Build `cls`; every unknown, renamed or refused key and every wrong type is reported at once."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    order = {key: i for i, key in enumerate(data)}  # problems are listed in the order the file sets the keys
    problems: list[tuple[str, str]] = []
    if not prefix:  # a YAML written for TRL's CLI: its keys are mapped, noted or refused (align/train/trl_keys.py)
        from align.train.trl_keys import carry_over

        # a recipe's own RENAMED wins over TRL's table: it knows what its TRL config calls the key
        known = set(fields) | set(getattr(cls, "RENAMED", {}))
        data, notes, problems = carry_over(data, known, lambda k: f"{_place(source, lines, k)}: {k}", lines)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        where = f"{_place(source, lines, dotted)}: {dotted}"
        if key not in fields:
            problems.append((key, f"{where}: {_unknown(cls, key, fields)}"))
            continue
        tp = hints[key]
        try:
            if dataclasses.is_dataclass(tp) and isinstance(value, dict):
                kwargs[key] = _build(tp, value, source, lines, dotted + ".")
            else:
                kwargs[key] = _coerce(value, tp, where)
        except ConfigError as e:
            problems.append((key, str(e)))
    if problems:
        problems.sort(key=lambda p: order.get(p[0], len(order)))
        raise ConfigError(_all_problems([text for _, text in problems], source, cls, fields))
    try:
        config = cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(_where_check_failed(str(e), source, lines, prefix, cls)) from None
    if not prefix:
        _print_notes(notes)  # only for a config that loads: with errors, those come first
    return config


def _all_problems(problems: list[str], source: str, cls: type, fields: dict) -> str:
    """One message: one problem on its line, or a count and one line per problem; the valid keys once."""
    keys = f"expected one of {sorted(fields)}" if any(": unknown key" in p for p in problems) else ""
    if len(problems) == 1:
        return "; ".join(filter(None, [problems[0], keys]))
    return "\n  ".join([f"{source}: {len(problems)} problems:", *problems, *([keys] if keys else [])])


def _unknown(cls: type, key: str, fields: dict) -> str:
    """A renamed key names its new spelling; another unknown key the nearest field, if one is close."""
    renamed = getattr(cls, "RENAMED", {}).get(key)
    if renamed:
        return f"renamed; use {renamed}"
    near = difflib.get_close_matches(key, fields, n=1)
    return f"unknown key (did you mean {near[0]}?)" if near else "unknown key"


def _print_notes(notes: list[str]) -> None:
    """TRL keys that have no effect here, one line each, said once (by the first of N launched processes)."""
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"[align] {note}", file=sys.stderr)


def _where_check_failed(message: str, source: str, lines: dict[str, int], prefix: str, cls: type) -> str:
    """`file:line: message` when the message starts with a field set on a line of the file, else `file: Class: message`."""
    head = message.split(":", 1)[0]
    fields = [w for w in head.replace(",", " ").split() if w not in ("and", "or")]
    for name in fields:
        if f"{prefix}{name}" in lines:
            return f"{_place(source, lines, prefix + name)}: {message}"
    if fields and fields[0] in {f.name for f in dataclasses.fields(cls)}:
        return f"{source}: {message}"
    return f"{source}: {prefix.rstrip('.') or cls.__name__}: {message}"


def _place(source: str, lines: dict[str, int | str], dotted: str) -> str:
    """Where a key was set: `file:line`, the override that set it (`--set key=value`), or just the file."""
    place = lines.get(dotted)
    if isinstance(place, str):
        return f"--set {place}"
    return f"{source}:{place}" if place is not None else source


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem})") from None


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from a YAML file (or defaults) plus `key.sub=value` overrides."""
    data: dict = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data, lines = _key_lines(path)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of {cls.__name__} fields at the top level")
    for item in overrides:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {part} is not a section")
        node[parts[-1]] = value
        lines[key] = item  # errors about this key name the override, not the file's line
    return _build(cls, data, source, lines)


# -- command line ----------------------------------------------------------------------------------
# The `--set` example shown in a recipe's help: the first of these fields the recipe's config has.
SET_EXAMPLES = {"beta": "0.2", "center_rewards_coefficient": "0.01", "packing": "true",
                "learning_rate": "1e-4"}


def set_example(cls: type) -> str:
    """`key=value` for `--set`, with a field `cls` has (a DPO example is no help for PPO)."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    key = next((k for k in SET_EXAMPLES if k in names), None)
    return f"{key}={SET_EXAMPLES[key]}" if key else f"{names[0]}=VALUE"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """`--config FILE`, `--set key=value`, and one `--<field> VALUE` flag per field of `cls`, with its help."""
    example = set_example(cls)
    key, value = example.split("=", 1)
    parser.add_argument("--config", help=f"YAML file mirroring {cls.__name__} (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a field, e.g. --set {example} (repeatable; same as --{key} {value})")
    group = parser.add_argument_group(f"{cls.__name__} fields (YAML keys; values are read as YAML)")
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        # `--model` is the name data check, advise and demo used: kept as a hidden alias.
        old = ["--model"] if f.name == "model_name_or_path" else []
        group.add_argument(f"--{f.name}", *old, dest=f"field__{f.name}", default=argparse.SUPPRESS,
                           metavar="VALUE", help=f"{help_text} (default: {default!r})".replace("%", "%%"))


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build `cls` from `--config`, then the `--<field>` flags, then `--set` (later wins)."""
    flags = [f"{k[len('field__'):]}={v}" for k, v in vars(args).items() if k.startswith("field__")]
    return load_config(cls, args.config, flags + list(args.overrides))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config, path: str | os.PathLike) -> None:
    """Write the resolved config (every field, defaults included) atomically."""
    from align.core.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
