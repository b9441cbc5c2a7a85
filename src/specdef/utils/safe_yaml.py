"""YAML from users, parsed with limits: PyYAML's safe loader (no Python objects), ``1e-3`` read as
a float, and before anything is built the document's size is bounded — in bytes, in nesting depth,
and in nodes *after* expanding aliases — so a kilobyte of nested aliases (a "billion laughs" file)
or a recursive anchor is a one-line error instead of a hang or a RecursionError.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from specdef.errors import SpecdefError

MAX_BYTES = 1024**2  # an experiment config is a few KB
MAX_NODES = 100_000  # scalars + collections after alias expansion
MAX_DEPTH = 64


class SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``)."""


SafeLoader.yaml_implicit_resolvers = copy.deepcopy(yaml.SafeLoader.yaml_implicit_resolvers)
SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_size(root: yaml.Node, what: str) -> None:
    """Expanded node count and depth of ``root`` (aliases are shared nodes: counted per use),
    memoized per node so the walk itself stays linear in the file."""
    sizes: dict[int, tuple[int, int]] = {}  # id → (expanded nodes, depth)
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = [sizes[id(c)] for c in _children(node)]
            size = 1 + sum(k[0] for k in kids)
            depth = 1 + max((k[1] for k in kids), default=0)
            if size > MAX_NODES or depth > MAX_DEPTH:
                raise SpecdefError(
                    f"{what} expands to more than {MAX_NODES:,} values or {MAX_DEPTH} levels "
                    "(nested aliases?); write the config out plainly."
                )
            sizes[key] = (size, depth)
            active.discard(key)
            continue
        if key in sizes:
            continue
        if key in active:
            raise SpecdefError(
                f"{what} has a recursive anchor (an alias inside itself); remove it."
            )
        active.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in active:
                raise SpecdefError(
                    f"{what} has a recursive anchor (an alias inside itself); remove it."
                )
            if id(child) not in sizes:
                stack.append((child, False))


def load_yaml(text: str, *, what: str) -> Any:
    """Parse ``text`` (``what`` names it in errors) within the limits above."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise SpecdefError(f"{what} is larger than {MAX_BYTES // 1024} KB; a config is plain data.")
    loader = SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, what)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise SpecdefError(f"Cannot parse {what} as YAML ({first}); fix the syntax.") from None
    finally:
        loader.dispose()
