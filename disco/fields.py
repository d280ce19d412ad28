"""Options dataclass fields that describe their own command-line argument, so that each option and its default is
stated once (TrainConfig for `disco train`, RunOptions for `disco run`; argparse is derived from them).

The contract, for TrainConfig (`disco train`) and any other options dataclass:

- Every field becomes one argparse argument, in field order, with `dest` = the field's name. Its flag is
  `--field-name` (underscores as dashes) unless metadata "flag" names it (a string, or a tuple of them);
  metadata "positional": True makes it a positional argument instead. metadata "cli": False leaves the field
  out (it then keeps its dataclass default).
- The default is the field's (default, or default_factory()). A field without one is a required option,
  unless metadata "required" is False: then it parses to None and the caller checks it (say, because
  another flag can stand in for it).
- The type comes from the annotation: int, float, str, Path or any class that parses a string; `X | None`
  (Optional[X]) parses as X, None meaning "not given"; Literal[...] gives the choices; dict takes
  `K=V,...` with Python-literal values (parse_kwargs). metadata "type" overrides the parsing function;
  a DiscoError it raises reaches the user as argparse's one-line error, with its message.
- A bool becomes a flag that flips the default: `--name` (store_true) when the default is False,
  `--no-name` (store_false) when it is True; its help says what the flag does.
- metadata "help" (required) is argparse help: write %% for a literal %. " (default: %(default)s)" is
  appended unless the default is None, a bool or empty, or the help names %(default)s itself.
  "help" and "choices" may be zero-argument functions, called when the parser is built: a help text or
  choices can then list a registry (tasks registered after the dataclass was defined included).
  metadata "metavar" passes through.

`option(...)` writes such a field; `add_options(parser, cls)` adds the arguments; `from_args(cls, args)`
builds the dataclass back from the parsed arguments.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import math
import types
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

from disco.errors import DiscoError

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, *, help: str | Callable[[], str], default_factory: Callable[[], Any] = MISSING,
           **metadata: Any) -> Any:
    """A dataclass field with its command-line description: `nodes: int = option(2, help="...")`.
    metadata: flag, positional, cli, required, type, choices, metavar (see the module docstring)."""
    known = {"flag", "positional", "cli", "required", "type", "choices", "metavar"}
    if set(metadata) - known:
        raise TypeError(f"option() got unknown metadata {sorted(set(metadata) - known)}; known: {sorted(known)}")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **metadata})


def option_of(cls: type, name: str) -> Any:
    """Option `name` of the options dataclass `cls` as a field of another (same default, help and metadata): an
    option two commands share (`disco run` and `disco serve`: --backend, --model-code...) is stated once."""
    source = cls.__dataclass_fields__[name]
    return dataclasses.field(default=source.default, default_factory=source.default_factory,
                             metadata=dict(source.metadata))


def add_options(parser: argparse.ArgumentParser, cls: type) -> dict[str, argparse.Action]:
    """One argument per field of the dataclass `cls` (see the module docstring); returns them by field name."""
    hints = get_type_hints(cls)
    return {f.name: parser.add_argument(*_names(f), **_settings(f, hints[f.name]))
            for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}


def from_args(cls: type, args: argparse.Namespace, **values: Any):
    """`cls` built from the parsed arguments of its fields (those add_options added), `values` taking precedence."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if f.metadata.get("cli", True) and hasattr(args, f.name)}
    return cls(**{**given, **values})


def parse_kwargs(text: str) -> dict:
    """'width_mult=0.5,dropout=0.1' -> {'width_mult': 0.5, 'dropout': 0.1} (Python literals; other text stays
    a string)."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise DiscoError(f"item {item!r} must look like name=value")
        try:
            result[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            result[key.strip()] = value.strip()
    return result


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _is_flag(f: dataclasses.Field, annotation) -> bool:
    return "type" not in f.metadata and _optional_inner(annotation) is bool


def _names(f: dataclasses.Field) -> tuple[str, ...]:
    if f.metadata.get("positional"):
        return (f.name,)
    flag = f.metadata.get("flag")
    if flag is not None:
        return (flag,) if isinstance(flag, str) else tuple(flag)
    dashed = f.name.replace("_", "-")
    return (f"--no-{dashed}",) if _default(f) is True else (f"--{dashed}",)


def _settings(f: dataclasses.Field, annotation) -> dict:
    """add_argument's keyword arguments for field `f`."""
    meta, default = f.metadata, _default(f)
    if "help" not in meta:
        raise TypeError(f"field {f.name!r} has no help: give it one, or metadata cli=False")
    settings: dict[str, Any] = {"help": _help(meta["help"], default)}
    if not meta.get("positional"):
        settings["dest"] = f.name
    if _is_flag(f, annotation):
        return {**settings, "action": "store_false" if default else "store_true", "default": bool(default)}
    parse, choices = _parser(f, annotation)
    settings["type"] = _reporting(parse)
    choices = meta.get("choices", choices)
    if choices is not None:
        settings["choices"] = tuple(choices() if callable(choices) else choices)
    if "metavar" in meta:
        settings["metavar"] = meta["metavar"]
    if default is MISSING and meta.get("required", True):
        if not meta.get("positional"):  # a positional argument is required by being there
            settings["required"] = True
    else:
        settings["default"] = None if default is MISSING else default
        if meta.get("positional"):
            settings["nargs"] = "?"
    return settings


def _optional_inner(annotation):
    """X for `X | None` and Optional[X]; the annotation itself otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [a for a in get_args(annotation) if a is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def _parser(f: dataclasses.Field, annotation) -> tuple[Callable[[str], Any], tuple | None]:
    """(function parsing the option's text, choices implied by the type or None)."""
    if "type" in f.metadata:
        return f.metadata["type"], None
    kind = _optional_inner(annotation)
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        return type(choices[0]), choices
    if kind is dict or get_origin(kind) is dict:
        return parse_kwargs, None
    if kind is float:
        return finite_float, None
    if isinstance(kind, type) and not issubclass(kind, (list, tuple, set, frozenset)):  # list("ab") is no parse
        return kind, None
    raise TypeError(f"field {f.name!r}: no command-line parsing for {annotation}; give metadata type=...")


def finite_float(text: str) -> float:
    """A float option: nan and inf are refused (every comparison with nan is false: it would pass every bound)."""
    try:
        value = float(text)
    except ValueError:
        raise DiscoError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise DiscoError(f"expected a finite number, got {text!r}")
    return value


def _reporting(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse turns a ValueError into 'invalid <type> value'; a DiscoError's message says more: keep it."""
    @functools.wraps(parse)
    def parse_option(text: str):
        try:
            return parse(text)
        except DiscoError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    return parse_option


def _help(text: str | Callable[[], str], default: Any) -> str:
    text = text() if callable(text) else text
    shown = default is not MISSING and default is not None and not isinstance(default, bool) and \
        (isinstance(default, (int, float)) or bool(default))
    return f"{text} (default: %(default)s)" if shown and "%(default)" not in text else text
