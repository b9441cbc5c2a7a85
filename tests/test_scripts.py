"""The scripts under ``scripts/`` regenerate published blocks of docs/attacks.md and docs/theory.md.
They are not part of the package, so a refactor of ``specdef`` can break them without any library
test noticing: import each one. And they stay thin callers of public functions (issue 12,
acceptance 5), read with ``ast``: no private module or name is imported (module level or inside a
function, ``importlib.import_module`` with a literal name too), no experiment machinery is defined
(run ids, pending lists, shards) and no attack grid is run — no script imports the attack loop or
the sweep (``run_attack``, ``run_sweep``, ``AttackSpec``, ``ModelVariant``, ``specdef.attack.sweep``)
or names a ``*GRID*`` / ``*PENDING*`` / ``*RUN_ID*`` constant. Attacks are experiment configs run
by ``specdef run`` (docs/experiments.md), their tables rendered by ``specdef report``."""

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
# An attack (let alone a grid of them) belongs in a config: the loop and the sweep are the runner's.
ATTACK_MACHINERY = {"run_attack", "run_sweep", "AttackSpec", "ModelVariant"}
ATTACK_MODULES = ("specdef.attack.loop", "specdef.attack.sweep")


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
            if module in ATTACK_MODULES:
                found.append(f"imports the attack machinery {module}")
            found += [f"imports {a.name}" for a in node.names if a.name in ATTACK_MACHINERY]
        elif isinstance(node, ast.Import):
            found += [f"imports private {a.name}" for a in node.names if _private(a.name)]
            found += [
                f"imports the attack machinery {a.name}"
                for a in node.names
                if a.name.startswith(ATTACK_MODULES)
            ]
        elif isinstance(node, ast.Call) and _literal_import(node) is not None:
            name = _literal_import(node) or ""
            if _private(name) or name.startswith(ATTACK_MODULES):
                found.append(f"imports {name} by importlib")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            word in node.name for word in MACHINERY
        ):
            found.append(f"defines {node.name}()")
        elif isinstance(node, ast.Attribute) and node.attr in ATTACK_MACHINERY:
            found.append(f"calls {node.attr}")
        elif (
            isinstance(node, ast.Name)
            and isinstance(node.ctx, ast.Store)
            and any(word in node.id.upper() for word in ("GRID", "PENDING", "RUN_ID"))
        ):
            found.append(f"defines {node.id}")
    return found


def _literal_import(node: ast.Call) -> str | None:
    """The literal module name of ``importlib.import_module("…")`` / ``__import__("…")``."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


@pytest.mark.parametrize("name", NAMES)
def test_script_imports_no_private_module_and_defines_no_runner(name: str) -> None:
    assert _violations((SCRIPTS / f"{name}.py").read_text(encoding="utf-8")) == []


def test_the_guard_finds_what_it_forbids() -> None:
    source = (
        "from __future__ import annotations\n"
        "import importlib\n"
        "import specdef.attack.loop as loop\n"
        "from specdef.informed.targets import TransformRecord, _Pair\n"
        "from specdef.attack.sweep import ModelVariant\n"
        "from specdef.attack import loop as loop2\n"
        "import specdef._internal\n"
        "LR_GRID = (1e-3, 1e-2)\n"
        "def run():\n    from specdef.x._y import z\n"
        "    importlib.import_module('specdef.zoo._cache')\n"
        "    loop.run_attack(None, None, None)\n"
        "def pending(path):\n    done_run_ids = set()\n    return []\n"
    )
    assert sorted(_violations(source)) == [
        "calls run_attack",
        "defines LR_GRID",
        "defines done_run_ids",
        "defines pending()",
        "imports ModelVariant",
        "imports private module specdef.x._y",
        "imports private specdef._internal",
        "imports private specdef.informed.targets._Pair",
        "imports specdef.zoo._cache by importlib",
        "imports the attack machinery specdef.attack.loop",
        "imports the attack machinery specdef.attack.sweep",
    ]


def test_the_guard_passes_a_thin_caller_of_public_functions() -> None:
    source = (
        "from specdef.defense.apply import apply_specdef_\n"
        "from specdef.zoo import load_model\n"
        "ALPHAS = (1e1, 1e2)\n"
        "def render():\n    return [apply_specdef_(load_model('mlp-digits'), a) for a in ALPHAS]\n"
    )
    assert _violations(source) == []
