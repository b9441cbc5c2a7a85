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
    u = torch.linalg.svd(weight.double())[0][:, :4]  # a separate SVD, the paper's T·W in float64
    exact = (torch.eye(24, dtype=torch.float64) + (1e3 - 1) * u @ u.T) @ weight.double()
    after = torch.linalg.svdvals(exact)
    stored = torch.linalg.svdvals(step.inflated.double())
    rep = step.report
    assert len(rep.sigma_before) == len(rep.sigma_after) == 4 + 5
    torch.testing.assert_close(
        torch.tensor(rep.sigma_before, dtype=torch.float64), sigma[:9], rtol=1e-10, atol=0
    )
    # σ after: those of the float64 W̃ (from the basis, no second SVD); the stored float32 W̃'s
    # differ by at most its rounding, ‖W̃₃₂ − W̃‖₂ ≤ eps₃₂·‖W̃‖_F (Weyl)
    reported = torch.tensor(rep.sigma_after, dtype=torch.float64)
    torch.testing.assert_close(reported, after[:9], rtol=1e-10, atol=0)
    rounding = 2**-23 * float(torch.linalg.matrix_norm(exact))
    assert float((reported - stored[:9]).abs().max()) <= rounding
    torch.testing.assert_close(after[:4], 1e3 * sigma[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(after[4:], sigma[4:], rtol=1e-10, atol=0)
    # reconstruction error: the stored pair on the fixed 16-column Gaussian probe, in float32
    omega = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1234))
    omega32 = omega.float()
    got = (step.compensation @ (step.inflated @ omega32)).double()
    ref = weight.double() @ omega32.double()
    probe = float(torch.linalg.matrix_norm(got - ref) / torch.linalg.matrix_norm(ref))
    assert rep.reconstruction_error == pytest.approx(probe, rel=1e-12)
    product = (step.compensation @ step.inflated).double()  # the dense product, in float32
    dense = float(
        torch.linalg.matrix_norm(product - weight.double())
        / torch.linalg.matrix_norm(weight.double())
    )
    assert 0.5 * dense <= rep.reconstruction_error <= 3 * dense
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
