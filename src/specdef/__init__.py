"""specdef: SpecDef, spectral convergence-rate control for open-weight models.

Defend a model (inflate top-k singular values of chosen weights by ``alpha`` and insert an exact
compensation layer), attack it with real fine-tuning, measure its Hessian, and run the informed
attacks that undo it. See ``docs/`` for the algorithm, the theory and the measured results.
"""

from __future__ import annotations

from specdef.errors import SpecdefError

__version__ = "0.1.0"

__all__ = ["SpecdefError", "__version__"]
