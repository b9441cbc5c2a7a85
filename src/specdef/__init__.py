"""specdef: SpecDef, spectral convergence-rate control for open-weight models.

Defend a model (inflate top-k singular values of chosen weights by ``alpha`` and insert an exact
compensation layer), attack it with real fine-tuning, measure its Hessian, and run the informed
attacks that undo it. See ``docs/`` for the algorithm, the theory and the measured results.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence

from specdef.errors import SpecdefError

__version__ = "0.1.0"

# the Python API, documented with tested examples in docs/api.md
__all__ = [
    "AttackSpec",
    "DefendRequest",
    "ModelVariant",
    "SearchConfig",
    "SpecDefConfig",
    "SpecdefError",
    "__version__",
    "apply_specdef_",
    "defend",
    "detect_checkpoint",
    "load_defended",
    "load_source",
    "load_task",
    "measure_curvature",
    "run_attack",
    "run_defense",
    "run_search",
    "save_defended",
    "undo_specdef_",
    "verify",
]

_LAZY = {
    "SpecDefConfig": "specdef.defense.config",
    "apply_specdef_": "specdef.defense.apply",
    "undo_specdef_": "specdef.defense.apply",
    "load_defended": "specdef.io.checkpoint",
    "save_defended": "specdef.io.checkpoint",
    "DefendRequest": "specdef.release.defend",
    "defend": "specdef.release.defend",
    "verify": "specdef.release.verify",
    "load_source": "specdef.release.sources",
    "run_defense": "specdef.release.tamperbench",
    "load_task": "specdef.zoo",
    "AttackSpec": "specdef.attack.loop",
    "run_attack": "specdef.attack.loop",
    "ModelVariant": "specdef.attack.sweep",
    "run_search": "specdef.attack.search.run",
    "SearchConfig": "specdef.attack.search.space",
    "measure_curvature": "specdef.defense.certify",
    "detect_checkpoint": "specdef.informed.detect",
}


def __getattr__(name: str) -> object:
    # lazy: `import specdef` stays light (no torch) until the defense API is used
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'specdef' has no attribute {name!r}")


# Defended checkpoints say `model_type: specdef` (specdef.io.hf). transformers is heavy, so instead of
# importing it here, register specdef with its Auto classes right after transformers itself imports
# them: `import specdef` stays light and `AutoModel*.from_pretrained(defended_dir)` still works.
_AUTO_CONFIG = "transformers.models.auto.configuration_auto"


def _register_with_transformers() -> None:
    importlib.import_module("specdef.io.hf").register()


class _AfterAutoConfig(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_with_transformers` once transformers' configuration_auto has loaded."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _AUTO_CONFIG:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            run(module)
            _register_with_transformers()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _AUTO_CONFIG in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _AfterAutoConfig) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterAutoConfig())
