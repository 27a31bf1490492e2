"""A small declarative schema for our YAML files.

Each file's shape is a list of ``Field``s; ``read_mapping`` checks one mapping against it and
collects every problem (unknown key with close matches, missing key, wrong type) with its
``file:line`` and field path. The same ``Field`` lists document the files (docs/configuration.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_stack.config.yamlfile import YamlDoc

_MISSING: Any = object()


@dataclass(frozen=True)
class Field:
    """One key of a mapping: its type, whether it is required, its default, what it means."""

    name: str
    types: tuple[type, ...]
    doc: str
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    @property
    def type_name(self) -> str:
        return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in self.types)


_TYPE_NAMES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "list",
    dict: "mapping",
    type(None): "null",
}


_ANNOTATION_TYPES: dict[str, tuple[type, ...]] = {
    "float": (int, float),
    "int": (int,),
    "str": (str,),
    "bool": (bool,),
    "tuple[str, ...]": (list,),
}


def fields_of(cls: type, names: Sequence[str] | None = None) -> list[Field]:
    """The ``Field``s of a settings dataclass whose fields carry a ``doc`` (see
    ``config/settings.py``): its defaults and meanings are then written once, there."""
    out = []
    for f in dataclasses.fields(cls):
        if "doc" in f.metadata and (names is None or f.name in names):
            out.append(Field(f.name, _ANNOTATION_TYPES[str(f.type)], f.metadata["doc"], f.default))
    return out


def describe(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def close_matches(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` when a choice is close to ``word``, else an empty string."""
    found = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"


class Problems:
    """Collects validation problems of one document, each located in the file."""

    def __init__(self, doc: YamlDoc) -> None:
        self.doc = doc
        self.items: list[str] = []

    def add(self, field_path: str, message: str) -> None:
        shown = field_path if field_path.isprintable() else repr(field_path)  # a key's "\r"
        label = f" {shown}:" if field_path else ""
        self.items.append(f"{self.doc.where(field_path)}:{label} {message}")

    def __bool__(self) -> bool:
        return bool(self.items)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int in Python; YAML's `port: yes` must not pass as a port.
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def read_mapping(
    value: Any, path: str, fields: Sequence[Field], problems: Problems
) -> dict[str, Any] | None:
    """Check ``value`` against ``fields``; return its keys with defaults filled, or None if bad.

    Every problem is recorded, not just the first, so one run reports a whole file's mistakes.
    """
    where = path or "the file"
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping, got {describe(value)}")
        return None
    known = {f.name: f for f in fields}
    out: dict[str, Any] = {}
    ok = True
    for key in value:
        if key not in known:
            problems.add(
                f"{path}.{key}" if path else str(key),
                f"unknown key {key!r} in {where}{close_matches(str(key), list(known))}",
            )
            ok = False
    for f in fields:
        sub = f"{path}.{f.name}" if path else f.name
        if f.name not in value:
            if f.required:
                problems.add(path, f"missing required key {f.name!r} ({f.doc})")
                ok = False
            else:
                out[f.name] = f.default
            continue
        item = value[f.name]
        if not _type_ok(item, f.types):
            problems.add(sub, f"expected {f.type_name}, got {describe(item)} ({item!r})")
            ok = False
            continue
        if isinstance(item, float) and not math.isfinite(item):  # .nan passes every `<= 0` check
            problems.add(sub, f"expected a finite number, got {item!r}")
            ok = False
            continue
        out[f.name] = (
            float(item)
            if float in f.types and int not in f.types and isinstance(item, int)
            else item
        )
    return out if ok else None
