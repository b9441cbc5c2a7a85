"""The house's walls, read from the source with ``ast`` (nothing is imported): no import cycle, no
import against the floors declared in docs/ARCHITECTURE.md, no function-level specdef import, no
private name reached across concepts, and a short docstring on every subpackage.

Every ``import`` / ``from … import`` counts — at module level, under ``if TYPE_CHECKING:``, inside
functions — and so does ``importlib.import_module("specdef.…")`` with a literal name. A module's
*concept* is its first component under ``specdef`` (``specdef.defense.guard`` → ``defense``).
``from specdef.x import y`` is an edge to ``specdef.x.y`` when that is a module, else to
``specdef.x``; the parent ``__init__`` Python runs first is not an extra edge (it sits on its
children's floor, so its own imports are checked against the same floor).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "specdef"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
FLOORS_MARKER = "<!-- floors: read by tests/test_architecture.py -->"
TOP = "specdef"  # the package itself: light, see test_package_root_is_light

# Function-level specdef imports that are allowed, as {(module, imported module): why}. A lazy
# import is for a heavy optional third-party dependency, never to dodge a cycle. An entry that no
# longer matches an import fails test_function_level_imports.
ALLOWED_LOCAL_IMPORTS: dict[tuple[str, str], str] = {
    ("specdef", "specdef.io.hf"): "registers model_type 'specdef' with transformers' Auto classes "
    "only once transformers itself loads them (a post-import hook): `import specdef` stays light",
}

MAX_INIT_DOCSTRING_LINES = 3


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (both dotted module names) at ``path:line``."""

    source: str
    target: str
    path: Path
    line: int
    local: bool  # inside a function or class body
    names: tuple[str, ...]  # the names taken by ``from … import``; () for ``import …``

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def concept(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else TOP


def _resolve(source: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


class _Collector(ast.NodeVisitor):
    def __init__(self, source: str, path: Path) -> None:
        self.source, self.path, self.depth = source, path, 0
        self.edges: list[Edge] = []

    def _add(self, target: str, line: int, names: tuple[str, ...] = ()) -> None:
        if target == TOP or target.startswith(TOP + "."):
            self.edges.append(Edge(self.source, target, self.path, line, self.depth > 0, names))

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _nested

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.source, self.path, node)
        modules = _modules()
        plain = [a.name for a in node.names if f"{base}.{a.name}" not in modules]
        for alias in node.names:
            if f"{base}.{alias.name}" in modules:
                self._add(f"{base}.{alias.name}", node.lineno)
        if plain:
            self._add(base, node.lineno, tuple(plain))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        arg = node.args[0] if node.args else None
        if name == "import_module" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            self._add(arg.value, node.lineno)
        self.generic_visit(node)


@cache
def edges() -> tuple[Edge, ...]:
    out: list[Edge] = []
    for module, path in _modules().items():
        collector = _Collector(module, path)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        out.extend(collector.edges)
    return tuple(out)


@cache
def floors() -> dict[str, int]:
    """concept → floor number, from the fenced block after FLOORS_MARKER in docs/ARCHITECTURE.md
    (one floor a line, lowest first: ``<number>  <concept> [<concept> …]``)."""
    text = DOC.read_text(encoding="utf-8")
    assert FLOORS_MARKER in text, f"{DOC.relative_to(ROOT)} lost its floors block ({FLOORS_MARKER})"
    block = text.split(FLOORS_MARKER, 1)[1].split("```", 2)[1]
    out: dict[str, int] = {}
    numbers = []
    for line in block.splitlines()[1:]:  # the first line is the fence's info string
        match = re.fullmatch(r"\s*(\d+)\s+(.+?)\s*", line)
        if not match:
            assert not line.strip(), f"unreadable floors line in ARCHITECTURE.md: {line!r}"
            continue
        numbers.append(int(match[1]))
        for name in re.split(r"[\s,]+", match[2]):
            assert name not in out, f"concept {name!r} is declared on two floors"
            out[name] = int(match[1])
    assert numbers == list(range(len(numbers))), f"floors must be numbered 0, 1, …: {numbers}"
    return out


def _concept_paths() -> dict[str, Path]:
    return {concept(m): p for m, p in _modules().items() if m != TOP}


# ------------------------------------------------------------------ the declaration itself


def test_floors_declare_every_concept_and_nothing_else() -> None:
    declared, present = set(floors()), set(_concept_paths())
    missing = sorted(present - declared)
    assert not missing, (
        f"concepts without a floor: {missing}; add each to the floors block of docs/ARCHITECTURE.md"
    )
    stale = sorted(declared - present)
    assert not stale, f"floors name concepts that no longer exist under src/specdef: {stale}"


def test_the_walker_sees_every_kind_of_import() -> None:
    """The collector itself, on known imports (a check that cannot pass on an empty graph)."""
    found = {(e.source, e.target, e.local) for e in edges()}
    assert ("specdef.streaming.shards", "specdef.streaming.resume", False) in found  # TYPE_CHECKING
    assert ("specdef.release.sources", "specdef.zoo", False) in found  # `from specdef import zoo`
    assert ("specdef.defense.apply", "specdef.defense.probe", False) in found  # package attribute
    assert ("specdef.cli", TOP, False) in found  # `from specdef import __version__`
    source = "def f():\n    from specdef.errors import SpecdefError\nimportlib.import_module('specdef.io')\n"
    collector = _Collector("specdef.x", PACKAGE / "x.py")
    collector.visit(ast.parse(source))
    assert [(e.target, e.line, e.local) for e in collector.edges] == [
        ("specdef.errors", 2, True),
        ("specdef.io", 3, False),
    ]


# ------------------------------------------------------------------ the walls


def _floor_violation(edge: Edge) -> str | None:
    level = floors()
    src, dst = concept(edge.source), concept(edge.target)
    if dst == TOP or src == dst or (src not in level and src != TOP) or dst not in level:
        return None  # the root is light and open to all; undeclared concepts fail their own test
    if src == TOP:
        if level[dst] == 0 or (edge.source, edge.target) in ALLOWED_LOCAL_IMPORTS:
            return None
        return f"the package root imports {edge.target} (floor {level[dst]}): the root stays light"
    if level[dst] > level[src]:
        return (
            f"{edge.source} (floor {level[src]} {src!r}) imports {edge.target} "
            f"(floor {level[dst]} {dst!r}): upward against the floors"
        )
    if level[dst] == level[src]:
        return (
            f"{edge.source} imports {edge.target}: {src!r} and {dst!r} share floor {level[src]} "
            "and must not import each other (split the floor in docs/ARCHITECTURE.md instead)"
        )
    return None


def test_no_import_runs_upward_against_the_floors() -> None:
    broken = [f"{e.where()}: {msg}" for e in edges() if (msg := _floor_violation(e))]
    assert not broken, "import floors broken:\n" + "\n".join(broken)


def _cycles() -> Iterator[list[Edge]]:
    """One concrete cycle per strongly connected component of the module graph (Tarjan)."""
    graph: dict[str, dict[str, Edge]] = {m: {} for m in _modules()}
    for e in edges():
        if e.target in graph:
            graph[e.source].setdefault(e.target, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                part.append(top)
                if top == node:
                    break
            if len(part) > 1 or node in graph[node]:
                components.append(part)

    for node in graph:
        if node not in index:
            visit(node)
    for part in components:
        members, start = set(part), min(part)
        # breadth-first inside the component, from start back to start: a shortest cycle
        paths: dict[str, list[Edge]] = {start: []}
        frontier = [start]
        while frontier:
            node = frontier.pop(0)
            if start in graph[node]:
                yield [*paths[node], graph[node][start]]
                break
            for dst, e in graph[node].items():
                if dst in members and dst not in paths:
                    paths[dst] = [*paths[node], e]
                    frontier.append(dst)


def test_no_import_cycle() -> None:
    found = [
        " → ".join([c[0].source, *(f"{e.target} ({e.where()})" for e in c)]) for c in _cycles()
    ]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_function_level_imports() -> None:
    local = {(e.source, e.target): e for e in edges() if e.local}
    bad = [
        f"{e.where()}: function-level import of {e.target} in {e.source}; import it at the top "
        "(a lazy import is only for a heavy optional third-party dependency)"
        for key, e in local.items()
        if key not in ALLOWED_LOCAL_IMPORTS
    ]
    stale = [f"allowlisted but gone: {key}" for key in ALLOWED_LOCAL_IMPORTS if key not in local]
    assert not bad + stale, "\n".join(bad + stale)


def test_no_private_name_is_reached_across_concepts() -> None:
    bad = []
    for e in edges():
        if concept(e.source) == concept(e.target):
            continue
        private = [p for p in e.target.split(".") if p.startswith("_") and p != "__init__"]
        private += [n for n in e.names if n.startswith("_") and not n.endswith("__")]
        if private:
            bad.append(f"{e.where()}: {e.source} reaches private {private} of {e.target}")
    assert not bad, "private names used outside their concept:\n" + "\n".join(bad)


# ------------------------------------------------------------------ the rooms' labels


def test_every_subpackage_says_in_a_few_lines_what_lives_there() -> None:
    problems = []
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        where = init.relative_to(ROOT)
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        if not doc:
            problems.append(f"{where}:1: no docstring saying what lives in this folder")
            continue
        lines = doc.strip().splitlines()
        if len(lines) > MAX_INIT_DOCSTRING_LINES:
            problems.append(
                f"{where}:1: docstring has {len(lines)} lines; say what lives here in "
                f"≤ {MAX_INIT_DOCSTRING_LINES} (details belong in the modules or docs/ARCHITECTURE.md)"
            )
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", doc))
        for module in sorted(init.parent.glob("*.py")):
            if not module.stem.startswith("_") and module.stem not in words:
                problems.append(f"{where}:1: docstring does not name its module {module.stem!r}")
    assert not problems, "\n".join(problems)


def test_package_root_is_light() -> None:
    """``import specdef`` loads no torch; every name in ``specdef.__all__`` is defined there or
    lazily resolved from the module that binds it at top level."""
    tree = ast.parse(_modules()[TOP].read_text(encoding="utf-8"))
    table: dict[str, str] = {}
    exported: list[str] = []
    bound: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    bound.add(target.id)
                    if target.id == "__all__":
                        exported = list(ast.literal_eval(node.value))  # type: ignore[arg-type]
                    if target.id == "_LAZY":
                        table = dict(ast.literal_eval(node.value))  # type: ignore[arg-type]
        elif isinstance(node, ast.ImportFrom):
            bound.update(a.asname or a.name for a in node.names)
    assert exported, "specdef/__init__.py has no __all__"
    for name in exported:
        if name in bound:
            continue
        assert name in table, f"specdef.__all__ names {name!r}, which is neither bound nor lazy"
        target = table[name]
        assert target in _modules(), f"specdef._LAZY maps {name!r} to missing module {target}"
        assert name in _top_level_names(target), f"{target} does not bind {name!r} at top level"
    code = (
        "import sys, specdef\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "print(heavy)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}  # this tree's specdef, not an installed one
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]", f"`import specdef` loads {out.stdout.strip()}"


def _top_level_names(module: str) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(_modules()[module].read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names
