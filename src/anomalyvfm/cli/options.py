"""Command-line options derived from the settings declarations (`anomalyvfm.declare`).

Each declared setting with a flag becomes one option with its help, type, choices and default, so a new
setting appears on the command line without touching this module; `settings_from_args` and
`runtime_from_args` turn the parsed options back into the library's objects, and `flag_name` lets a
`SettingError` name the flag the user typed.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from anomalyvfm.adaptation.config import AdaptationConfig
from anomalyvfm.data import LAYOUTS
from anomalyvfm.declare import declared, flag_of
from anomalyvfm.detector.settings import Runtime, Settings

_PREFIX = {Settings: "", Runtime: "", AdaptationConfig: "lora_"}  # argparse dest = prefix + field name


def _add(group: Any, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f, spec in declared(cls):
        flag = flag_of(f, spec)
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        if flag is None or dataclasses.is_dataclass(hint):  # nested settings have their own group (--lora)
            continue
        kwargs: dict[str, Any] = {"dest": _PREFIX[cls] + f.name, "default": f.default, "help": spec.help}
        if hint is not bool and not spec.choices:
            kwargs["metavar"] = f.name.upper()
        if hint is bool:  # --name / --no-name: a default may be either
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(hint) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(hint)[0])
        else:
            kwargs.update(type=hint)
            if f.default is not None:
                kwargs["help"] += " (default: %(default)s)"
        if spec.choices:
            kwargs["choices"] = spec.choices
        group.add_argument(flag, **kwargs)


def add_fit_options(parser: argparse.ArgumentParser) -> None:
    """Options that define a detector; shared by every command that fits one."""
    parser.add_argument("--data", required=True, help="dataset root folder")
    parser.add_argument("--layout", choices=LAYOUTS, default="mvtec_ad2", help="dataset layout (default: mvtec_ad2)")
    _add(parser, Settings)
    add_runtime_options(parser)
    parser.add_argument("--max-train-images", type=int, help="use at most N evenly spaced training images (quick runs)")
    lora = parser.add_argument_group("LoRA adaptation (EXPERIMENTAL: not better than frozen features, docs/adaptation.md)")
    lora.add_argument("--lora", action="store_true", help="EXPERIMENTAL: adapt the backbone with LoRA (and train anomaly "
                                                          "heads); it did not beat frozen features (docs/adaptation.md)")
    _add(lora, AdaptationConfig)


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Options that change how, not what, a detector computes."""
    _add(parser, Runtime)


def _values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, _PREFIX[cls] + f.name) for f, spec in declared(cls)
            if flag_of(f, spec) is not None and hasattr(args, _PREFIX[cls] + f.name)}


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = _values(args, Settings)
    values.pop("lora")  # the --lora switch; its settings are the LoRA group's options
    # A local backbone directory is stored absolute so the model loads from any working directory.
    if Path(values["backbone"]).is_dir():
        values["backbone"] = str(Path(values["backbone"]).resolve())
    return Settings(**values, lora=AdaptationConfig(**_values(args, AdaptationConfig)) if args.lora else None)


def runtime_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime options as keyword arguments (for `Runtime(...)` or `AnomalyDetector.load(...)`)."""
    return _values(args, Runtime)


def flag_name(setting: str) -> str:
    """The command-line flag of a setting named in a `SettingError` (the setting's own name if it has none)."""
    for cls in _PREFIX:
        for f, spec in declared(cls):
            if f.name == setting:
                return flag_of(f, spec) or setting
    return "--" + setting.replace("_", "-")
