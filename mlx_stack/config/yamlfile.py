"""Load YAML with line numbers, so validation errors can name the file, line and field path.

Both the catalog and the stack file go through here: they are parsed once into plain data
plus a map from field path (``tiers.fast.port``) to line number.

Limits come first, since the supervisor re-reads the stack file whenever it changes: a file
over :data:`MAX_BYTES` is refused unread, and a document that expands to more than
:data:`MAX_NODES` nodes (a "billion laughs" of nested aliases takes a few hundred bytes) is
refused after composing it, before anything walks the expansion. Both errors say what to fix.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_stack.errors import ConfigError


@dataclass
class YamlDoc:
    """A parsed YAML document and where each field path stands in its file."""

    path: Path
    data: Any
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, field_path: str) -> str:
        """``file:line`` of a field path, falling back to its nearest parent that has a line
        (at last the document's first line, ``""``); only an empty document has none."""
        probe = field_path
        while True:
            if probe in self.lines:
                return f"{self.path}:{self.lines[probe]}"
            if not probe:
                return str(self.path)
            probe = probe.rpartition(".")[0]


MAX_BYTES = 256 * 1024
"""A stack file is a few kilobytes, a catalog tens; more is a mistake (or an attack)."""
MAX_NODES = 100_000
"""Nodes after expanding aliases; the shipped catalog has ~700."""
MAX_DEPTH = 64
"""Nesting levels; our files use at most five."""

NEWLINE = "\n"
_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present


class _UniqueKeyLoader(_Base):  # type: ignore[misc, valid-type]
    """A safe loader that refuses duplicate keys instead of silently keeping the last one, and
    reports a scalar its tag cannot read (``!!int abc``, a 5,000-digit number) at its line:
    PyYAML's own constructors raise ValueError, IndexError, KeyError... there."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, LookupError, AttributeError, TypeError, ArithmeticError) as exc:
            if not isinstance(node, yaml.ScalarNode):
                raise
            tag = node.tag.rpartition(":")[2]
            value = node.value if len(node.value) <= 40 else node.value[:37] + "..."
            why = f" ({str(exc)[:100]})" if isinstance(exc, ValueError) else ""  # others: noise
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {value!r} as {tag}{why}", node.start_mark) from None


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):  # `? [a, b]`: a list or mapping cannot be a key
            raise yaml.constructor.ConstructorError(
                None, None, f"a {type(key).__name__} cannot be a key", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check_size(node: yaml.Node) -> tuple[str, str] | None:
    """What is wrong with a composed document's size (``:line`` or "", the problem), or None.
    Each distinct node is visited once (aliases share nodes), so this costs the file's size,
    not its expansion."""
    expanded: dict[int, int] = {}
    depth_of: dict[int, int] = {}

    def walk(n: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _TooDeep(n.start_mark.line + 1)
        key = id(n)
        if key in expanded and depth_of[key] >= depth:
            return expanded[key]
        children: list[yaml.Node] = []
        if isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        elif isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        total = 1
        for c in children:
            total += walk(c, depth + 1)
            if total > MAX_NODES:
                break
        expanded[key], depth_of[key] = total, depth
        return total

    try:
        total = walk(node, 0)
    except _TooDeep as exc:
        return f":{exc.args[0]}", f"nested more than {MAX_DEPTH} levels deep"
    if total > MAX_NODES:  # the whole document's expansion: no one line is at fault
        return "", (f"expands to more than {MAX_NODES:,} values (nested aliases?); "
                    "write the values out instead of repeating anchors")
    return None


class _TooDeep(Exception):
    pass


def _key_text(node: yaml.Node) -> str:
    """A key as the validators spell its field path: ``str()`` of its value (``0x10`` -> 16)."""
    if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:str":
        try:
            return str(yaml.constructor.SafeConstructor().construct_document(node))
        except Exception:  # the loader has already refused what cannot be read
            pass
    return str(node.value)


def _index_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = _key_text(key_node)
            path = f"{prefix}.{key}" if prefix else key
            out[path] = key_node.start_mark.line + 1
            _index_lines(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = item.start_mark.line + 1
            _index_lines(item, path, out)


def parse_yaml(text: str, path: Path) -> YamlDoc:
    """Parse ``text`` (read from ``path``); malformed YAML raises ConfigError with the line."""
    if len(text) > MAX_BYTES:
        raise ConfigError(path, [f"{path}: {len(text):,} characters; the limit is "
                                 f"{MAX_BYTES:,} (is this the right file?)"])
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        problem = _check_size(node) if node is not None else None
        if problem:
            line, what = problem
            raise ConfigError(path, [f"{path}{line}: refused: the document {what}"])
        data = loader.construct_document(node) if node is not None else None
    except RecursionError:
        raise ConfigError(path, [f"{path}: refused: nested too deeply"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or str(exc)
        raise ConfigError(path, [f"{path}{line}: malformed YAML: {problem}"]) from None
    except yaml.reader.ReaderError as exc:  # a control character: located by its first use
        char = chr(exc.character) if isinstance(exc.character, int) else ""
        at = text.find(char) if char else -1
        line = f":{text.count(NEWLINE, 0, at) + 1}" if at >= 0 else ""
        raise ConfigError(path, [f"{path}{line}: malformed YAML: unacceptable character "
                                 f"{char!r}: {exc.reason}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"{path}: malformed YAML: {exc}"]) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        lines[""] = node.start_mark.line + 1
        _index_lines(node, "", lines)
    return YamlDoc(path=path, data=data, lines=lines)


def load_yaml(path: Path) -> YamlDoc:
    """Read and parse a YAML file; a missing, unreadable or oversized file is a ConfigError too."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ConfigError(path, [f"{path}: larger than {MAX_BYTES:,} bytes; a stack file or "
                                     "catalog is a few kilobytes (is this the right file?)"])
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(path, [f"{path}: file not found"]) from None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, [f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); "
                                 "save the file as UTF-8"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"{path}: cannot read: {exc}"]) from None
    return parse_yaml(text, path)
