"""Settings declared once: each dataclass field carries its help text, flag, allowed values and range.

Validation, the command-line options, the model file's schema and the service's model card are all
derived from these declarations, so adding a setting means adding one field and nothing else. Values
are checked and normalised (lists → tuples, ints → floats where a float is declared) when the
dataclass is built, so an invalid setting never reaches expensive work.

Errors speak the library's language (`image_size must be at least 14`); a front end that knows its
own names for settings (the CLI's `--image-size`) renders the same error with them (`SettingError.render`).
"""
from __future__ import annotations

import dataclasses
import string
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from anomalyvfm.errors import UserInputError


@dataclass(frozen=True)
class Spec:
    """What a front end needs to know about one setting besides its name, type and default."""

    help: str
    flag: str | None = ""  # "" → `--` + name with dashes; None → not a command-line option
    choices: tuple | None = None
    low: float | None = None  # inclusive lower bound, or exclusive with `low_open`
    low_open: bool = False
    high: float | None = None  # inclusive upper bound


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field declaring one setting (see `Spec` for the keywords)."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


class SettingError(UserInputError):
    """An invalid setting. `template` names settings as `{name}` so each front end can render its own names."""

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        names = {key for _, key, _, _ in string.Formatter().parse(self.template) if key}
        return self.template.format(**{key: name_of(key) for key in names})


def declared(cls: type) -> list[tuple[dataclasses.Field, Spec]]:
    """The declared settings of a dataclass (fields with a `Spec`), in declaration order."""
    return [(f, f.metadata["spec"]) for f in dataclasses.fields(cls) if "spec" in f.metadata]


def flag_of(f: dataclasses.Field, spec: Spec) -> str | None:
    return "--" + f.name.replace("_", "-") if spec.flag == "" else spec.flag


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as type `hint` (bool, int, float, str, tuple[X, ...], Optional, nested dataclass) or a `SettingError`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingError(f"{{{name}}} must be a list of {_type_name(args[0])}, got {value!r}")
        return tuple(_coerce(name, item, args[0]) for item in value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return from_dict(hint, value, name)
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise SettingError(f"{{{name}}} must be {_type_name(hint)}, got {value!r}")


def _check_value(name: str, value: Any, spec: Spec) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if item is None or dataclasses.is_dataclass(item):
            continue
        if spec.choices is not None and item not in spec.choices:
            raise SettingError(f"unknown {{{name}}} '{item}' (choose from {', '.join(map(str, spec.choices))})")
        if spec.low is not None and (item <= spec.low if spec.low_open else item < spec.low):
            bound = f"at least {spec.low:g}" if not spec.low_open else "positive" if spec.low == 0 else f"above {spec.low:g}"
            raise SettingError(f"{{{name}}} must be {bound}, got {item}")
        if spec.high is not None and item > spec.high:
            raise SettingError(f"{{{name}}} must be at most {spec.high:g}, got {item}")


def normalise(obj: Any) -> None:
    """Coerce and check every declared field of a (frozen) dataclass instance in place; call from `__post_init__`."""
    hints = typing.get_type_hints(type(obj))
    for f, spec in declared(type(obj)):
        value = _coerce(f.name, getattr(obj, f.name), hints[f.name])
        _check_value(f.name, value, spec)
        object.__setattr__(obj, f.name, value)


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-ready dict of a settings dataclass (tuples as lists, nested settings as dicts)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return to_dict(value)
        return list(value) if isinstance(value, tuple) else value

    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build `cls` from a dict, refusing unknown keys by name (a typo must not be silently ignored)."""
    if not isinstance(data, Mapping):
        raise UserInputError(f"{where}: expected an object of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserInputError(f"{where}: unknown setting{'s' * (len(unknown) > 1)} {', '.join(unknown)}")
    return cls(**data)
