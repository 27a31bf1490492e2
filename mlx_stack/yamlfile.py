"""Load YAML with line numbers, so validation errors can name the file, line and field path.

Both the catalog and the stack file go through here: they are parsed once into plain data
plus a map from field path (``tiers.fast.port``) to line number.
"""

from __future__ import annotations

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
        """``file:line`` of a field path, falling back to its nearest parent that has a line."""
        probe = field_path
        while probe:
            if probe in self.lines:
                return f"{self.path}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return str(self.path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
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


def _index_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
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
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or str(exc)
        raise ConfigError(path, [f"{path}{line}: malformed YAML: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"{path}: malformed YAML: {exc}"]) from None
    lines: dict[str, int] = {}
    if node is not None:
        _index_lines(node, "", lines)
    return YamlDoc(path=path, data=data, lines=lines)


def load_yaml(path: Path) -> YamlDoc:
    """Read and parse a YAML file; a missing or unreadable file is a ConfigError too."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, [f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"{path}: cannot read: {exc}"]) from None
    return parse_yaml(text, path)
