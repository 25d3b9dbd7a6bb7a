"""The one mapping between typed configs (frozen dataclasses) and command-line options.

`add_options(parser, Config)` adds one option per field: the name from the field (`batch_size` →
`--batch-size`), the type, choices (`Literal`) and default from the annotation and the field, and
the help from `Annotated[type, "help"]` (or an `Opt` for what a name and a type cannot say). A field
without a default is required; `bool` fields are switch pairs (`--bf16` / `--no-bf16`);
`tuple[int, ...]` takes several values; a field whose type is itself a config dataclass contributes
its own fields, flat. `from_args(Config, args)` builds the config back.
Defaults are shown by the help formatter from the fields themselves, never restated in help text.
Imports nothing heavy: the runtime image builds this CLI for `trainer publish`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal


@dataclass(frozen=True)
class Opt:
    """What a field's name and type cannot say: its help, another flag name, a parser, fixed choices."""

    help: str = ""
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class _Field:
    name: str
    base: Any  # the annotation without Annotated and without `| None`
    optional: bool
    opt: Opt
    default: Any  # dataclasses.MISSING when required


def parse_split(text: str) -> tuple[float, ...]:
    """'8:1:1' or '0.8,0.1,0.1' → fractions summing to 1 (two parts = train/val, one = train on everything)."""
    parts = [float(p) for p in text.replace(",", ":").split(":")]
    if len(parts) not in (1, 2, 3) or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"split needs 1 to 3 non-negative parts, got {text!r}")
    return tuple(p / sum(parts) for p in parts)


def _fields(config: type) -> list[_Field]:
    hints = typing.get_type_hints(config, include_extras=True)
    out = []
    for f in dataclasses.fields(config):
        hint, opt = hints[f.name], Opt()
        if typing.get_origin(hint) is Annotated:
            hint, *extras = typing.get_args(hint)
            opt = next((e for e in extras if isinstance(e, Opt)), Opt(next((e for e in extras if isinstance(e, str)), "")))
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(_Field(f.name, base, optional, opt, default))
    return out


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def add_options(parser: argparse.ArgumentParser, config: type, *, exclude: Iterable[str] = (),
                _taken: set[str] | None = None) -> None:
    """One option per field of `config` (flattening nested configs); a name already added is shared."""
    taken = set() if _taken is None else _taken
    for f in _fields(config):
        if f.name in exclude or f.name in taken:
            continue
        if _is_config(f.base) and not f.optional:
            add_options(parser, f.base, exclude=exclude, _taken=taken)
            continue
        kwargs = _option(f)
        if kwargs is None:
            continue  # a field the command line cannot express (an optional nested config): the command sets it
        taken.add(f.name)
        flag, help = f.opt.flag or "--" + f.name.replace("_", "-"), f.opt.help
        if f.base is not bool and "choices" not in kwargs:
            kwargs["metavar"] = flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag, dest=f.name, help=help, **kwargs)


def _option(f: _Field) -> dict[str, Any] | None:
    required = f.default is dataclasses.MISSING
    kwargs: dict[str, Any] = {"required": True} if required else {"default": f.default}
    if f.base is bool:  # --name and --no-name, whatever the default (which may depend on the machine)
        return {"action": argparse.BooleanOptionalAction, "default": f.default}
    if f.opt.parse is not None:
        return kwargs | {"type": f.opt.parse}
    if f.opt.choices is not None:
        return kwargs | {"choices": f.opt.choices}
    if typing.get_origin(f.base) is Literal:
        return kwargs | {"choices": typing.get_args(f.base)}
    if typing.get_origin(f.base) is tuple:
        item = typing.get_args(f.base)[0]
        return kwargs | {"type": item, "nargs": "+"}
    if f.base in (int, float, str, Path):
        return kwargs | {"type": f.base}
    return None


def from_args(config: type, args: argparse.Namespace, **given: Any) -> Any:
    """`config` from the parsed options (nested configs too); `given` fields win. An option left at None
    where the field has another default (a name shared by two configs) takes the field's default."""
    values: dict[str, Any] = {}
    for f in _fields(config):
        if f.name in given:
            values[f.name] = given[f.name]
        elif _is_config(f.base) and not f.optional:
            values[f.name] = from_args(f.base, args)
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is None and f.default is not dataclasses.MISSING:
                value = f.default
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return config(**values)


class HelpFormatter(argparse.HelpFormatter):
    """Adds each option's default, taken from its config field (on/off for switches; none for required or unset
    options)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is not None and not action.required and action.option_strings \
                and action.default not in (None, argparse.SUPPRESS):
            shown = ("on" if action.default else "off") if isinstance(action.default, bool) else "%(default)s"
            action = copy.copy(action)
            action.help = " ".join(filter(None, [action.help, f"(default: {shown})"]))
        return super()._format_action(action)
