"""Typed run configuration: a dataclass becomes a command line, a TOML file, and a saved JSON record.

Every stage declares a `@dataclass` whose fields are its options. `parse_config(Cls, argv, presets)` builds it
with this precedence (later wins):

    dataclass defaults  <  --preset NAME  <  --config FILE.toml  <  command-line flags

(`cakelm STAGE --resume` puts the options saved with the run in --out between the defaults and the preset.)

Nested dataclasses become dotted flags (`--optim.lr 3e-4`, `--model.n-layers 6`) and TOML tables (`[optim]`).
A field may declare a short alias in its metadata (`--lr` for `optim.lr`). Unknown keys and values of the wrong
type are errors that name the key and where it came from; range checks live in each dataclass's
`__post_init__` and raise `ConfigError`.

    @dataclass
    class Cfg:
        steps: int = opt(100, "optimizer steps", alias="--max-steps")
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad option value or config file; the message is one line that names the option and its source."""


def opt(default: Any = dataclasses.MISSING, help: str = "", *, alias: str | None = None,
        choices: Sequence[Any] | None = None, positional: bool = False) -> Any:
    """A dataclass field with command-line metadata. Mutable defaults (lists) are copied per instance."""
    meta = {"help": help, "alias": alias, "choices": tuple(choices) if choices else None, "positional": positional}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(cls: type, help: str = "", **defaults: Any) -> Any:
    """A nested dataclass field (its options appear as `--name.option`). `defaults` override the nested class's
    own defaults for this use (a stage's loop runs 600 steps by default, another's 100)."""
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata={"help": help, "defaults": defaults})


# ----------------------------------------------------------------------------------------------------------------
# Introspection helpers


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `int` -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _leaves(cls: type, prefix: str = "") -> dict[str, tuple[dataclasses.Field, Any]]:
    """Flatten a dataclass into {"dotted.name": (field, type)} for every non-dataclass field."""
    out: dict[str, tuple[dataclasses.Field, Any]] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (f, tp)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a JSON-ready nested dict."""
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def differing(saved: dict[str, Any], now: dict[str, Any], ignore: Collection[str] = ()) -> list[str]:
    """The dotted keys whose values differ between two (nested) configs, sorted, leaving out `ignore` and options
    the saved config does not have (added to cakelm since it was saved); then `describe_differences` says which,
    for a one-line error."""
    a, b = flatten(saved), flatten(now)
    return [k for k in sorted(a) if k not in ignore and a.get(k) != b.get(k)]


def describe_differences(keys: Sequence[str], saved: dict[str, Any], now: dict[str, Any]) -> str:
    """"k (saved 1, now 2), ... and N more": the first three of `keys` (from `differing`) with both values."""
    a, b = flatten(saved), flatten(now)
    shown = ", ".join(f"{k} (saved {a.get(k)!r}, now {b.get(k)!r})" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


# ----------------------------------------------------------------------------------------------------------------
# Value checking / coercion


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Check a TOML/preset value against the field's type (ints are accepted for floats)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' cannot be empty")
    if typing.get_origin(inner) is list:
        (elem,) = typing.get_args(inner)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(key, v, elem, source) for v in value]
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if inner in (int, float, str) and (not isinstance(value, inner) or isinstance(value, bool)):
        raise ConfigError(f"{source}: '{key}' must be {inner.__name__}, got {value!r}")
    return value


def _check_choice(key: str, value: Any, choices: tuple | None, source: str) -> None:
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")


def _build(cls: type[T], flat: dict[str, Any], prefix: str = "", defaults: dict[str, Any] | None = None) -> T:
    """Construct a (nested) dataclass from a flat dotted dict; `__post_init__` checks run on the way. Only given
    values are passed, so values a `__post_init__` derives (e.g. from 0 = auto) are derived afresh."""
    kwargs: dict[str, Any] = dict(defaults or {})
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, flat, f"{prefix}{f.name}.", f.metadata.get("defaults"))
        elif prefix + f.name in flat:
            kwargs[f.name] = flat[prefix + f.name]
    return cls(**kwargs)


def build_config(cls: type[T], *layers: tuple[str, dict[str, Any]]) -> T:
    """Merge (source_name, {dotted_key: value}) layers over the defaults and build the dataclass.

    Unknown keys and wrongly-typed values raise ConfigError naming the source (e.g. the TOML file)."""
    leaves = _leaves(cls)
    flat: dict[str, Any] = {}
    for source, layer in layers:
        for key, value in layer.items():
            if key not in leaves:
                raise ConfigError(f"{source}: unknown option '{key}'")
            f, tp = leaves[key]
            value = _coerce(key, value, tp, source)
            _check_choice(key, value, f.metadata.get("choices"), source)
            flat[key] = value
    return _build(cls, flat)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a flat dotted dict, with one-line errors for missing/invalid files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    try:
        with open(p, "rb") as fh:
            return flatten(tomllib.load(fh))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None


def config_from_dict(cls: type[T], d: dict[str, Any], source: str = "saved config") -> T:
    """Rebuild a config from `to_dict` output (e.g. meta.json of a checkpoint)."""
    return build_config(cls, (source, flatten(d)))


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, presets: dict[str, dict] | None = None) -> None:
    """Add one flag per leaf field of `cls` (defaults suppressed so only given flags are seen)."""
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=argparse.SUPPRESS,
                            help="named set of defaults (applied before --config and flags)")
    parser.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                        help="TOML file of options (applied after --preset, before flags)")
    defaults = flatten(to_dict(cls()))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, (f, tp) in _leaves(cls).items():
        meta = f.metadata
        inner, _ = _unwrap_optional(tp)
        section = key.rsplit(".", 1)[0] if "." in key else None
        target = parser
        if section:
            if section not in groups:
                groups[section] = parser.add_argument_group(f"{section} options")
            target = groups[section]
        default = defaults[key]
        help_text = (meta.get("help") or "") + (f" (default: {default})" if default not in (None, [], "") else "")
        kw: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("positional"):
            # Positional arguments (a checkpoint directory, say) are always required on the command line.
            kw.pop("dest")
            kw["help"] = meta.get("help") or ""
            parser.add_argument(key, **kw)
            continue
        names = [_flag(key)]
        if meta.get("alias"):
            names.insert(0, meta["alias"])
        if inner is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is list:
            (elem,) = typing.get_args(inner)
            kw.update(nargs="+", type=elem, metavar=key.rsplit(".", 1)[-1].upper())
        else:
            kw.update(type=inner, metavar=key.rsplit(".", 1)[-1].upper())
        target.add_argument(*names, **kw)


def arg_layers(ns: argparse.Namespace, presets: dict[str, dict] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The (source, {dotted_key: value}) layers parsed arguments give, in precedence order: the preset, the TOML
    file, the flags."""
    reserved = {"config", "command"} | ({"preset"} if presets else set())
    given = {k: v for k, v in vars(ns).items() if k not in reserved}
    layers: list[tuple[str, dict[str, Any]]] = []
    preset = getattr(ns, "preset", None) if presets else None
    if preset is not None:
        layers.append((f"preset '{preset}'", presets[preset]))
    if getattr(ns, "config", None):
        layers.append((str(ns.config), load_toml(ns.config)))
    layers.append(("command line", given))
    return layers


def config_from_args(cls: type[T], ns: argparse.Namespace, presets: dict[str, dict] | None = None) -> T:
    """Turn parsed arguments into the config, applying preset and TOML file first."""
    return build_config(cls, *arg_layers(ns, presets))


def parse_config(cls: type[T], argv: Sequence[str] | None = None, presets: dict[str, dict] | None = None,
                 prog: str | None = None) -> T:
    """Parse `argv` into `cls` (used by tests and for calling a stage from Python with CLI-style strings)."""
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser, cls, presets)
    return config_from_args(cls, parser.parse_args(argv), presets)
