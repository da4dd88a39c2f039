"""CLI flags generated from the settings schema (`nas.settings`), so a default and its help exist once.

`add_flags(parser, Model, fields)` adds one `--field-name` per field with the type, choices and help
(description and default) taken from the schema; an unset flag is absent from the parsed arguments,
so building the model with `settings_from_args` gives the schema's default. Hand-written because argparse
is all the CLI needs: pydantic-settings' CLI would replace argparse's sub-commands wholesale.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterable
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from nas.errors import ConfigError


def add_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    fields: Iterable[str] | None = None,
    names: dict[str, str] | None = None,
    required: Iterable[str] = (),
) -> None:
    """One flag per field of `model` (all, or `fields`); `names` renames flags (field -> flag name)."""
    names = names or {}
    for name in fields or model.model_fields:
        info = model.model_fields[name]
        flag = "--" + names.get(name, name).replace("_", "-")
        help_text = (info.description or "").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": _dest(name, names), "help": help_text}
        if name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS
            kwargs["help"] += f" (default: {_shown(info.default)})".replace("%", "%%")
        parser.add_argument(flag, **kwargs, **_parse_rule(info.annotation))


def settings_from_args(
    args: argparse.Namespace, model: type[BaseModel], fields: Iterable[str] | None = None,
    names: dict[str, str] | None = None, **fixed: Any,
) -> Any:  # fmt: skip
    """`model` built from the flags that were given (the schema's defaults for the rest) plus `fixed`."""
    names = names or {}
    given = {
        name: getattr(args, _dest(name, names))
        for name in (fields or model.model_fields)
        if hasattr(args, _dest(name, names))
    }
    try:
        return model(**given, **fixed)
    except ConfigError as e:  # name the flag, not the field
        message = str(e)
        for name in given:
            if message.startswith((f"{name} ", f"{name}:")):
                message = "--" + names.get(name, name).replace("_", "-") + message[len(name) :]
        raise ConfigError(message) from None


def _dest(name: str, names: dict[str, str]) -> str:
    return names.get(name, name).replace("-", "_")


def _shown(default: Any) -> str:
    if isinstance(default, list | tuple):
        return " ".join(map(str, default)) or "none"
    return "none" if default is None else str(default)


def _parse_rule(annotation: Any) -> dict[str, Any]:
    """argparse's type / choices / nargs / action for a field's annotation."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):  # X | None: a flag takes an X
        return _parse_rule(next(a for a in args if a is not type(None)))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": args, "type": type(args[0])}
    if origin is tuple:
        return {"nargs": len(args), "type": args[0], "metavar": ("X",) * len(args)}
    if origin is list:  # comma-separated, repeatable
        return {"type": _comma_list, "action": "extend"}
    return {"type": annotation}


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def split_weight(spec: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` of a --data flag as (path, weight); a ':' that is not a weight (e.g. in a URL or a
    Windows drive) stays in the path."""
    path, _, weight = spec.rpartition(":")
    try:
        return (path, float(weight)) if path else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def add_restart(p, text: str) -> None:
    p.add_argument("--restart", action="store_true", help=text)


def add_overwrite(p) -> None:
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file that nas did not write"
    )
