"""Reading JSON that a user or a peer hands us (manifests, topologies, run configurations, link headers): bounded
and checked before anything trusts it. The size is capped before a byte is read, the text must be UTF-8, the
nesting shallow, every number finite and the top level of the expected type; any failure is one `DiscoError`
naming the file, never a traceback, an endless read or a NaN that flows on. A leaf module."""
from __future__ import annotations

import json
import math
import stat
from pathlib import Path

from disco.errors import DiscoError

SMALL_JSON_BYTES = 16 << 20  # a run configuration, a topology, a model config: far below this
MAX_DEPTH = 32  # the deepest file disco writes (a nested deployment's levels table) nests 6 deep


def read_json(path: str | Path, *, what: str, max_bytes: int, expect: type = dict):
    """The JSON value in the regular file `path` (at most `max_bytes`), whose top level is an `expect`."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as error:
        raise DiscoError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DiscoError(f"the {what} {path} is not a regular file")
    if info.st_size > max_bytes:
        raise DiscoError(f"the {what} {path} is {info.st_size:,} bytes; at most {max_bytes:,} are read")
    try:
        with open(path, "rb") as stream:
            raw = stream.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as error:
        raise DiscoError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    if len(raw) > max_bytes:
        raise DiscoError(f"the {what} {path} is over {max_bytes:,} bytes")
    return parse_json(raw, what=f"the {what} {path}", expect=expect)


def parse_json(raw: bytes | str, *, what: str, expect: type = dict):
    """`raw` parsed as above; `what` names it in errors."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise DiscoError(f"{what} is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as error:
        raise DiscoError(f"{what} is not valid JSON ({error})") from None
    except RecursionError:
        raise DiscoError(f"{what} nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:  # a non-finite number
        raise DiscoError(f"{what}: {error}") from None
    if _depth(value) > MAX_DEPTH:
        raise DiscoError(f"{what} nests deeper than {MAX_DEPTH} levels")
    if not isinstance(value, expect):
        raise DiscoError(f"{what} must hold a JSON {_json_name(expect)}, found a {_json_name(type(value))}")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number (numbers must be finite)")
    return value


def _depth(value) -> int:
    """Nesting depth of lists and objects, without recursion (a hostile file must not exhaust the stack)."""
    if not isinstance(value, (list, dict)):
        return 0
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            return depth
        children = item.values() if isinstance(item, dict) else item
        # only containers are pushed: a manifest's long lists of channel numbers are skipped in one C-level pass
        pending.extend((child, depth + 1) for child in children if type(child) in (list, dict))
    return deepest


def _json_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)
