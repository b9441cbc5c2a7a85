"""The holdout matrix (issue 17): for every architecture family in tests/_archs.py, an Algorithm-1
checkpoint reloads with stock ``from_pretrained`` (specdef imported) to the defended function, its
float64 output stays within the guard's tolerance of the original model, and detection finds exactly
the defended layers from the saved tensors alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import specdef  # noqa: F401 - registers model_type "specdef" with transformers' Auto classes
from _archs import ARCHS, output
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import default_tolerance
from specdef.defense.layer import defended_layers
from specdef.informed.detect import detect_checkpoint
from specdef.io.checkpoint import save_defended


def _float64(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_algorithm1_checkpoint_reloads_with_stock_transformers(tmp_path: Path, arch: str) -> None:
    entry = ARCHS[arch]
    model = entry.build().double()
    batch = _float64(entry.batch())
    # the oracle goes through the same stock loader (some families, e.g. Gemma, compute buffers at
    # load time that differ from a .double() cast by ~1e-7): only the defense differs between the two
    model.save_pretrained(str(tmp_path / "undefended"))
    auto = getattr(transformers, entry.auto)
    reference = output(auto.from_pretrained(str(tmp_path / "undefended")).eval(), batch)
    apply_specdef_(model, SpecDefConfig(alpha=1e3, top_k=2, targets="all-linear"))
    defended = set(defended_layers(model))
    assert defended
    path = save_defended(model, tmp_path / arch)

    loaded = auto.from_pretrained(str(path)).eval()
    assert set(defended_layers(loaded)) == defended
    gap = float((output(loaded, batch) - reference).abs().max() / reference.abs().max())
    assert gap <= default_tolerance(torch.float64), gap

    found = detect_checkpoint(path)
    assert {p.inflated.removesuffix(".inflated") for p in found.pairs} == defended
