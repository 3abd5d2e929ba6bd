"""Read compose files as Docker Compose does, for the parts this project uses: YAML with `!reset`,
`${VAR:-default}` interpolation, and the merge of an override file onto the main one."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode

__all__ = ["Reset", "interpolate", "load", "merge", "plain"]


@dataclass(frozen=True)
class Reset:
    """Compose's `!reset` tag: merging removes the key (the tagged value itself is ignored)."""

    value: Any


class _ComposeConstructor(SafeConstructor):
    """The safe constructor plus `!reset`, without touching ruamel's shared SafeConstructor."""


def _construct_reset(constructor: SafeConstructor, node: Node) -> Reset:
    if isinstance(node, SequenceNode):
        return Reset(constructor.construct_sequence(node, deep=True))
    if isinstance(node, MappingNode):
        return Reset(constructor.construct_mapping(node, deep=True))
    return Reset(constructor.construct_scalar(node))


_ComposeConstructor.add_constructor("!reset", _construct_reset)


def load(path: Path) -> dict[str, Any]:
    yaml = YAML(typ="safe", pure=True)
    yaml.Constructor = _ComposeConstructor
    document = yaml.load(path)
    assert isinstance(document, dict), f"{path.name} is not a mapping"
    return document


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))"
)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?message}` and `$$`; an unset variable without a
    default is an error here (compose would warn and substitute an empty string)."""

    def value(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"]
        given = env.get(name)
        if op in (":-", "-"):
            return arg if given is None or (op == ":-" and not given) else given
        if given is None or (op == ":?" and not given):
            raise KeyError(f"${{{name}}} is unset: {arg or 'no default'}")
        return given

    if isinstance(node, str):
        return _INTERPOLATION.sub(value, node)
    if isinstance(node, dict):
        return {key: interpolate(item, env) for key, item in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, Reset):
        return Reset(interpolate(node.value, env))
    return node


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """An override file merged onto `base`: mappings key by key, `!reset` removes, a scalar replaces.

    Compose appends some sequences (ports, volumes ...) instead of replacing them; an override with a
    plain sequence is refused here rather than merged by the wrong rule."""
    merged = dict(base)
    for key, value in override.items():
        assert not isinstance(value, list), f"{key}: a sequence in an override is not merged here"
        if isinstance(value, Reset):
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def plain(node: Any) -> Any:
    """The document without its tags (`!reset x` is `x`), as the compose schema sees a file on its own."""
    if isinstance(node, Reset):
        return plain(node.value)
    if isinstance(node, dict):
        return {key: plain(item) for key, item in node.items()}
    if isinstance(node, list):
        return [plain(item) for item in node]
    return node
