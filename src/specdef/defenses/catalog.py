"""The built-in defenses, registered: importing this module fills the registry of
:mod:`specdef.defenses.registry` with SpecDef (Algorithm 1, native, on top of an unlearned model)
and the baselines (gradient ascent, NPO, RMU, RepNoise, TAR, condition-number immunization).
"""

from __future__ import annotations

from specdef.defenses import immunization, representation, spectral, tar, unlearning
from specdef.defenses.registry import (
    DefenseEntry,
    defense_names,
    get_defense_entry,
    make_defense,
    register_defense,
)

BUILTIN: tuple[DefenseEntry, ...] = (
    *spectral.ENTRIES,
    *unlearning.ENTRIES,
    *representation.ENTRIES,
    *tar.ENTRIES,
    *immunization.ENTRIES,
)
for _entry in BUILTIN:
    register_defense(_entry, replace=True)

__all__ = ["BUILTIN", "defense_names", "get_defense_entry", "make_defense", "register_defense"]
