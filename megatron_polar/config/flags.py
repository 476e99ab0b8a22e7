"""Megatron-style flags generated from typed dataclass fields, and the YAML files that set them.

A config dataclass declares each field once, with its help text, through `option(...)`;
`add_flags` turns the fields into argparse flags (`tensor_model_parallel_size` ->
`--tensor-model-parallel-size`; a nested dataclass field `fp8` gives `--fp8-format`,
`--fp8-recipe`, ...), and `from_namespace` builds the dataclass back from parsed flags, so that
its `__post_init__` checks every value once. `load_yaml` reads a `--config` file of flag values
(keys are flag names without the dashes, `-` or `_`); flags on the command line win.

Nothing here imports the rest of the package: every layer may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Mapping, Optional

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the file, key or flag."""


def option(default: Any = MISSING, *, help: str = "", flag: Optional[str] = None,
           choices: Optional[Mapping[str, Any] | tuple] = None, nargs: Optional[str] = None,
           metavar: Optional[str] = None, default_factory: Any = MISSING,
           cli: bool = True) -> Any:
    """A dataclass field with its flag. `choices` as a mapping offers its keys on the command
    line and stores the mapped values (`--transformer-impl local` -> False); `flag` overrides
    the generated name; `cli=False` keeps the field off the command line."""
    meta = {"help": help, "flag": flag, "choices": choices, "nargs": nargs, "metavar": metavar,
            "cli": cli}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _base_type(hint) -> Any:
    """int for Optional[int], str for list[str], the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (list, tuple) and args:
        return args[0]
    if origin is typing.Union and len(args) == 1:
        return _base_type(args[0])
    return hint


def _flag_fields(cls, prefix: str = ""):
    """(field, dest, flag, base type) of every command-line field, nested dataclasses
    flattened with their field name as a prefix."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        hint = _base_type(hints[f.name])
        if dataclasses.is_dataclass(hint):
            yield from _flag_fields(hint, prefix + f.name + "_")
            continue
        flag = f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-")
        yield f, _dest(flag), flag, hint


def _dest(flag: str) -> str:
    """argparse's dest of a flag (and the key of a --config file, dashes or underscores)."""
    return flag.lstrip("-").replace("-", "_")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def add_flags(parser, cls, prefix: str = "") -> None:
    """Add a flag for every command-line field of the dataclass `cls` to `parser` (a parser or
    an argument group)."""
    for f, dest, flag, base in _flag_fields(cls, prefix):
        meta, default = f.metadata, _default(f)
        kwargs: dict[str, Any] = {"dest": dest, "help": meta.get("help") or None}
        choices = meta.get("choices")
        if base is bool and not isinstance(choices, Mapping):
            if default:  # on by default: --flag and --no-flag, as Megatron-LM's --no-* flags
                if not flag.startswith("--"):
                    raise TypeError(f"{cls.__name__}.{f.name}: {flag} needs a --long name")
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=True,
                                    **kwargs)
            else:
                parser.add_argument(flag, action="store_true", **kwargs)
            continue
        if isinstance(choices, Mapping):
            inverse = [k for k, v in choices.items() if v == default]
            kwargs.update(choices=list(choices), default=inverse[0] if inverse else default)
        else:
            kwargs.update(type=None if base is str else base, default=default)
            if choices is not None:
                kwargs["choices"] = list(choices)
        for key in ("nargs", "metavar"):
            if meta.get(key) is not None:
                kwargs[key] = meta[key]
        parser.add_argument(flag, **kwargs)


def from_namespace(cls, ns: argparse.Namespace, prefix: str = "", **overrides):
    """An instance of `cls` from parsed flags (fields off the command line keep their
    defaults unless given in `overrides`). A value its `__post_init__` refuses is a
    ConfigError."""
    hints, values = _hints(cls), dict(overrides)
    for f in dataclasses.fields(cls):
        if f.name in values or not f.metadata.get("cli", True):
            continue
        hint = _base_type(hints[f.name])
        if dataclasses.is_dataclass(hint):
            values[f.name] = from_namespace(hint, ns, prefix + f.name + "_")
            continue
        value = getattr(ns, _dest(f.metadata.get("flag") or "--" + prefix + f.name))
        choices = f.metadata.get("choices")
        if isinstance(choices, Mapping) and value in choices:
            value = choices[value]
        values[f.name] = value
    try:
        return cls(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_yaml(path: str, known: set[str], flag: str = "--config") -> dict:
    """The values of a YAML file of flag values, keyed by argparse dest; unknown keys, a file
    that cannot be read and YAML that is not a mapping are ConfigErrors naming the file."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag} {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path}: expected a mapping of flag names to values")
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise ConfigError(f"{flag} {path}: unknown key {key!r} (keys are the tool's flag "
                              "names without the leading dashes)")
        values[dest] = value
    return values
