"""The scripts under ``scripts/`` regenerate published blocks of docs/attacks.md and docs/theory.md.
They are not part of the package, so a refactor of ``specdef`` can break them without any library
test noticing: import each one. And they stay thin callers of public functions: no private module
or name is imported, and no experiment machinery (run ids, pending lists) is defined — studies are
experiment configs run by ``specdef run`` (docs/experiments.md), their pages rendered by
``specdef report``."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
NAMES = sorted(p.stem for p in SCRIPTS.glob("*.py"))
MACHINERY = ("run_id", "pending", "shard")  # what the experiment runner owns


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_script_imports(name: str) -> None:
    module = _load(name)
    assert callable(getattr(module, "render", None)) or callable(getattr(module, "main", None))


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and part != "__future__" for part in dotted.split("."))


def _violations(source: str) -> list[str]:
    """Private imports (module or name, function-level ones included) and definitions of the
    experiment runner's machinery."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if _private(module):
                found.append(f"imports private module {module}")
            found += [f"imports private {module}.{a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"imports private {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            word in node.name for word in MACHINERY
        ):
            found.append(f"defines {node.name}()")
    return found


@pytest.mark.parametrize("name", NAMES)
def test_script_imports_no_private_module_and_defines_no_runner(name: str) -> None:
    assert _violations((SCRIPTS / f"{name}.py").read_text(encoding="utf-8")) == []


def test_the_guard_finds_what_it_forbids() -> None:
    source = (
        "from __future__ import annotations\n"
        "from specdef.informed.targets import TransformRecord, _Pair\n"
        "import specdef._internal\n"
        "def run():\n    from specdef.x._y import z\n"
        "def pending(path):\n    return []\n"
    )
    assert sorted(_violations(source)) == [
        "defines pending()",
        "imports private module specdef.x._y",
        "imports private specdef._internal",
        "imports private specdef.informed.targets._Pair",
    ]
