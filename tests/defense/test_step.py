"""The per-layer step every defend path shares: its tensors and report against a separate SVD and
a hand-computed product, its seeding rule, and the one "forced" rule of the run report."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specdef.defense.apply import DefenseReport
from specdef.defense.config import SpecDefConfig
from specdef.defense.step import LayerReport, defend_layer, layer_seed
from specdef.errors import SpecdefError


def _weight(m: int = 24, n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def test_exact_step_against_a_separate_svd_and_product() -> None:
    weight = _weight()  # float32
    config = SpecDefConfig(alpha=1e3, top_k=4, method="exact")
    step = defend_layer("block.proj", weight, config, bias=True)
    assert step.inflated.dtype == step.compensation.dtype == torch.float32
    assert step.inflated.shape == (24, 40) and step.compensation.shape == (24, 24)
    sigma = torch.linalg.svdvals(weight.double())
    after = torch.linalg.svdvals(step.inflated.double())
    rep = step.report
    assert len(rep.sigma_before) == len(rep.sigma_after) == 4 + 5
    torch.testing.assert_close(
        torch.tensor(rep.sigma_before, dtype=torch.float64), sigma[:9], rtol=1e-10, atol=0
    )
    # W̃'s spectrum comes from the basis (deformed_spectrum): α·σ on the top k, the tail unchanged —
    # exact for the float64 W̃, within float32 rounding (Weyl) of the stored one's
    expected = sigma[:9].clone()
    expected[:4] *= 1e3
    torch.testing.assert_close(
        torch.tensor(rep.sigma_after, dtype=torch.float64), expected, rtol=1e-12, atol=0
    )
    eps = torch.finfo(torch.float32).eps * float(torch.linalg.matrix_norm(step.inflated.double()))
    assert (
        float((torch.tensor(rep.sigma_after, dtype=torch.float64) - after[:9]).abs().max())
        <= 4 * eps
    )
    torch.testing.assert_close(after[:4], 1e3 * sigma[:4], rtol=1e-5, atol=0)
    torch.testing.assert_close(after[4:], sigma[4:], rtol=1e-3, atol=1e-3)
    product = (step.compensation @ step.inflated).double()  # multiplied in float32, as stored
    error = float(
        torch.linalg.matrix_norm(product - weight.double())
        / torch.linalg.matrix_norm(weight.double())
    )
    # the guard's probe estimate (spectral.probe_reconstruction_error): within its documented
    # range of the dense in-dtype error — never below 0.67×, and in float32 1–3× (it also counts the
    # rounding of W̃x at scale α·σ₁, which the model's forward incurs)
    assert 0.67 * error <= rep.reconstruction_error <= 3.0 * error
    assert 0 < rep.reconstruction_error < rep.tolerance == 5e-2
    assert (rep.params_before, rep.params_after) == (24 * 40 + 24, 24 * 40 + 24 * 24 + 24)
    assert rep.output_gap is None and rep.bias and rep.dtype == "float32"
    assert LayerReport.from_dict(rep.to_dict()) == rep


def test_seeding_rule_is_per_name_not_per_call_order() -> None:
    weight = _weight(64, 48)
    config = SpecDefConfig(alpha=1e3, top_k=4, method="randomized", seed=5)
    first = defend_layer("a", weight, config, bias=False)
    defend_layer("b", _weight(64, 48, seed=1), config, bias=False)  # draws nothing from "a"'s
    again = defend_layer("a", weight, config, bias=False)
    assert torch.equal(first.inflated, again.inflated)
    assert torch.equal(first.compensation, again.compensation)
    other = defend_layer("c", weight, config, bias=False)
    assert not torch.equal(first.inflated, other.inflated)  # another name, another sketch
    assert layer_seed(5, "a") != layer_seed(5, "c") != layer_seed(6, "c")


def test_step_refusals() -> None:
    config = SpecDefConfig(alpha=1e3, top_k=30)
    with pytest.raises(SpecdefError, match="exceeds the rank bound min"):
        defend_layer("x", _weight(), config, bias=False)
    bad = _weight()
    bad[1, 2] = float("nan")
    with pytest.raises(SpecdefError, match="NaN or Inf entries in its weight"):
        defend_layer("x", bad, SpecDefConfig(alpha=1e3, top_k=4), bias=False)


def test_one_forced_rule_counts_the_output_gap() -> None:
    config = SpecDefConfig(alpha=1e3, top_k=4, force=True)
    rep = defend_layer("x", _weight(), config, bias=False).report
    quiet = DefenseReport.summarize(config, [rep], params_before=1, params_after=2)
    assert not quiet.forced and quiet.over_tolerance == ()
    loud_gap = dataclasses.replace(rep, output_gap=2 * rep.tolerance)  # recon error below
    forced = DefenseReport.summarize(config, [loud_gap], params_before=1, params_after=2)
    assert forced.forced and forced.over_tolerance == ("x",)
    by_model = DefenseReport.summarize(
        config, [rep], params_before=1, params_after=2, model_output_gap=0.2, model_tolerance=0.1
    )
    assert by_model.forced and by_model.over_tolerance == ()
    assert DefenseReport.from_dict(by_model.to_dict()) == by_model
