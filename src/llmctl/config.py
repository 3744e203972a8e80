"""Typed command configs: defaults in code < a TOML file < `--set key=value` overrides.

Each command owns a frozen dataclass; fields may be nested dataclasses (addressed as
`near.threshold`). Help text lives in `field(metadata={"help": ...})`.

Example:
    cfg = load_config(CleanConfig, Path("clean.toml"), ["language.keep=['en','fr']", "workers=2"])
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from llmctl.errors import UsageError

T = TypeVar("T")


def helpful(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (lists and dicts get a default_factory)."""
    if isinstance(default, list | dict):
        return dataclasses.field(
            default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def nested(cls: type, help: str = "") -> Any:
    """A field holding a nested config dataclass with its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise UsageError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise UsageError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}': expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}': expected a table of settings, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"config key '{key}': expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise UsageError(f"unknown config key '{prefix}{unknown[0]}' (known: {known})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"config{' ' + prefix.rstrip('.') if prefix else ''}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (nested dataclasses become tables)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = base
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise UsageError(f"config key '{key}': '{p}' is not a table")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one `key=value`; the value is TOML (`3`, `0.5`, `true`, `['en']`) or a bare string."""
    if "=" not in item:
        raise UsageError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UsageError(f"--set expects key=value, got '{item}'")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as `near.keep=longest`
    return key, value


def load_toml(config_file: Path) -> dict[str, Any]:
    """A --config file's table; one line naming the file if it is missing or not TOML."""
    from llmctl.files import MAX_JSON_BYTES, display, read_bytes

    path = Path(config_file)
    if not path.exists():
        raise UsageError(f"{display(path)}: config file not found")
    try:  # read_bytes: a regular file only (a FIFO given as --config must not block)
        return tomllib.loads(read_bytes(path, MAX_JSON_BYTES, "config file").decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{display(path)}: not valid TOML: {e}") from e


def load_config(
    cls: type[T],
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> T:
    """Resolve a config: dataclass defaults < TOML file < typed CLI options < `--set` items.

    `options` holds typed CLI options that were given (None values are ignored).
    Unknown keys and ill-typed values raise UsageError naming the key.
    """
    values: dict[str, Any] = {} if config_file is None else load_toml(config_file)
    for key, value in (options or {}).items():
        if value is not None:
            _merge(values, key, value)
    for item in overrides or []:
        key, value = parse_override(item)
        _merge(values, key, value)
    # Nested tables are merged onto the nested defaults, so `near.threshold` keeps `near.keep`.
    defaults = to_dict(cls())  # type: ignore[call-arg]
    return _build(cls, _deep_update(defaults, values))


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """Rows of (key, value, help) for `--show-config`, nested keys dotted."""
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, prefix=f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, repr(value), f.metadata.get("help", "")))
    return rows
