"""specdef: SpecDef, spectral convergence-rate control for open-weight models.

Defend a model (inflate top-k singular values of chosen weights by ``alpha`` and insert an exact
compensation layer), attack it with real fine-tuning, measure its Hessian, and run the informed
attacks that undo it. See ``docs/`` for the algorithm, the theory and the measured results.
"""

from __future__ import annotations

from specdef.errors import SpecdefError

__version__ = "0.1.0"

__all__ = [
    "SpecDefConfig",
    "SpecdefError",
    "__version__",
    "apply_specdef_",
    "load_defended",
    "save_defended",
    "undo_specdef_",
]

_LAZY = {
    "SpecDefConfig": "specdef.defense.apply",
    "apply_specdef_": "specdef.defense.apply",
    "undo_specdef_": "specdef.defense.apply",
    "load_defended": "specdef.io.checkpoint",
    "save_defended": "specdef.io.checkpoint",
}


def __getattr__(name: str) -> object:
    # lazy: `import specdef` stays light (no torch) until the defense API is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'specdef' has no attribute {name!r}")
