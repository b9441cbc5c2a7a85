"""The scripts under ``scripts/`` regenerate published pages (docs/results, docs/attacks.md,
docs/theory.md). They are not part of the package, so a refactor of ``specdef`` can break them
without any library test noticing: import each one, and render the two results pages from an empty
run directory (the path a fresh clone takes before anything has run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(p.stem for p in SCRIPTS.glob("*.py")))
def test_script_imports(name: str) -> None:
    module = _load(name)
    assert callable(getattr(module, "render", None)) or callable(getattr(module, "main", None))


def test_informed_attacks_page_renders_without_runs(tmp_path: Path) -> None:
    page = _load("informed_attacks").render(tmp_path)
    assert "{{" not in page
    for heading in ("## 1. Detection", "## 2. The transforms", "## 3. Digits", "## 4. SmolLM2"):
        assert heading in page


def test_native_vs_algorithm1_page_renders_without_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _load("native_vs_algorithm1")
    monkeypatch.setattr(module, "RUNS", tmp_path)
    page = module.render()
    assert page.startswith("# Native deformation vs Algorithm 1")
    assert "## How to read this" in page
