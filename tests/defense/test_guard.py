"""specdef.defense.guard: the tolerance table, the refusals before anything is deformed (tied
weights, top_k above the rank bound, NaN / Inf entries) and the precision guard's layer refusal,
whose suggested alpha is checked against a hand-built float64 deformation rounded to the dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny import tiny_llama, tiny_qwen2
from specdef.defense import guard
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError


def test_tolerance_table_lookup() -> None:
    for dtype, tolerance in guard.DEFAULT_TOLERANCE.items():
        assert guard.default_tolerance(dtype) == tolerance
    # float64 is held to (near) its own precision; the narrow dtypes share one bound
    assert guard.DEFAULT_TOLERANCE[torch.float64] < 1e-6 < guard.DEFAULT_TOLERANCE[torch.float32]
    # a dtype the table does not list gets the documented fallback (default_tolerance's docstring)
    assert torch.complex64 not in guard.DEFAULT_TOLERANCE
    assert guard.default_tolerance(torch.complex64) == 5e-2


def test_tied_weights_are_refused_and_stay_tied() -> None:
    model = tiny_llama()  # ties lm_head to embed_tokens
    with pytest.raises(SpecdefError, match=r"'lm_head' shares its weight with model\.embed_tokens"):
        guard.check_untied(model, ["lm_head"])
    guard.check_untied(model, ["model.layers.0.mlp.gate_proj"])  # not tied: accepted
    guard.check_untied(tiny_qwen2(), ["lm_head"])  # Qwen2's head is untied: accepted
    with pytest.raises(SpecdefError, match=r"'lm_head' shares its weight .*embed_tokens") as info:
        apply_specdef_(model, SpecDefConfig(alpha=10, top_k=2, targets=("lm_head",)))
    assert "\n" not in str(info.value) and "--exclude lm_head" in str(info.value)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not defended_layers(model)


def test_check_layer_refuses_top_k_above_the_rank_bound() -> None:
    weight = torch.randn(6, 4)
    guard.check_layer("a", weight, None, top_k=4)  # top_k = min(m, n) is allowed
    with pytest.raises(
        SpecdefError, match=r"top_k=5 exceeds the rank bound min\(m, n\)=4 of layer 'a' \(6×4\)"
    ):
        guard.check_layer("a", weight, None, top_k=5)


@pytest.mark.parametrize(("where", "value"), [("weight", float("nan")), ("bias", float("inf"))])
def test_check_layer_refuses_non_finite_entries(where: str, value: float) -> None:
    weight, bias = torch.randn(3, 5), torch.randn(3)
    (weight if where == "weight" else bias)[1] = value
    with pytest.raises(SpecdefError, match=rf"'b' has NaN or Inf entries in its {where}"):
        guard.check_layer("b", weight, bias, top_k=1)


def test_apply_refuses_before_touching_the_model() -> None:
    model = tiny_llama()
    with pytest.raises(SpecdefError, match=r"top_k=49 exceeds the rank bound min\(m, n\)=48"):
        apply_specdef_(model, SpecDefConfig(alpha=10, top_k=49, targets=("o_proj",)))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(SpecdefError, match=r"layers\.1\.self_attn\.o_proj' has NaN or Inf"):
        apply_specdef_(model, SpecDefConfig(alpha=10, top_k=2, targets=("o_proj",)))
    assert not defended_layers(model)


def _error_in(dtype: torch.dtype, weight: torch.Tensor, basis: np.ndarray, alpha: float) -> float:
    """Oracle: T = I + (α−1)UUᵀ and C = I + (1/α−1)UUᵀ built in float64 by hand, W̃ = T·W and C
    rounded to ``dtype`` and multiplied there (what the model runs), ‖C·W̃ − W‖_F / ‖W‖_F."""
    w = weight.double().numpy()
    proj = basis @ basis.T
    eye = np.eye(w.shape[0])
    inflated = torch.from_numpy((eye + (alpha - 1) * proj) @ w).to(dtype)
    compensation = torch.from_numpy(eye + (1 / alpha - 1) * proj).to(dtype)
    product = (compensation @ inflated).double().numpy()
    return float(np.linalg.norm(product - w) / np.linalg.norm(w))


def test_layer_refusal_names_an_alpha_that_fits() -> None:
    weight = torch.randn(32, 24, generator=torch.Generator().manual_seed(0))
    basis = np.linalg.svd(weight.double().numpy())[0][:, :4]  # separate SVD: numpy's
    tolerance, alpha = guard.DEFAULT_TOLERANCE[torch.float32], 1e9
    error = _error_in(torch.float32, weight, basis, alpha)
    assert error > tolerance
    refusal = guard.layer_refusal(
        "model.x", weight, torch.from_numpy(basis), reconstruction_error=error, output_gap=None,
        tolerance=tolerance, alpha=alpha,
    )  # fmt: skip
    msg = str(refusal)
    assert "\n" not in msg and isinstance(refusal, SpecdefError)
    assert f"layer 'model.x' has reconstruction error ‖C·W̃−W‖/‖W‖ {error:.3g} in float32" in msg
    assert "at alpha=1e+09, above the tolerance 0.05" in msg and "--force" in msg
    safe = float(msg.split("≈")[1].split(".")[0].split()[0])
    assert 1 < safe < alpha
    assert _error_in(torch.float32, weight, basis, safe) <= tolerance
    # one significant digit, rounded down: ten times the suggestion no longer fits
    assert _error_in(torch.float32, weight, basis, 10 * safe) > tolerance


def test_layer_refusal_names_the_larger_error() -> None:
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    basis = torch.linalg.qr(torch.randn(8, 2, dtype=torch.float64))[0]
    msg = str(
        guard.layer_refusal(
            "w",
            weight,
            basis,
            reconstruction_error=1e-3,
            output_gap=0.2,
            tolerance=0.05,
            alpha=100.0,
        )
    )
    assert "has probe output gap 0.2 in float32 at alpha=100" in msg
    assert guard.over_tolerance_ratio(1e-3, 0.2, 0.05) == pytest.approx(4.0)
    assert guard.over_tolerance_ratio(0.1, None, 0.05) == pytest.approx(2.0)


def test_model_gap_refusal_scales_alpha_down_by_the_gap() -> None:
    msg = str(
        guard.model_gap_refusal(
            0.5, tolerance=0.05, dtype=torch.bfloat16, alpha=1e4, worst_layer="a", worst_error=0.01
        )
    )
    assert "\n" not in msg and "moved by 0.5 (relative) in bfloat16 at alpha=10000" in msg
    # the gap grows linearly in alpha: 1 + (α − 1)·0.8·tol/gap ≈ 800, rounded down to one digit
    assert "worst layer 'a'" in msg and "for this model is ≈800 (estimated)" in msg


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf"), True, "1e-5"])
def test_check_tolerance_is_the_one_check_of_a_given_tolerance(bad: object) -> None:
    """The config and (tests/release/test_verify.py, tests/test_cli.py) ``verify`` and
    ``specdef verify --tolerance`` refuse the same values through ``guard.check_tolerance``, in
    one line naming what was given."""
    assert guard.check_tolerance(None) is None and guard.check_tolerance(1e-5) == 1e-5
    for refuse in (
        lambda: guard.check_tolerance(bad, name="--tolerance"),  # type: ignore[arg-type]
        lambda: SpecDefConfig(alpha=10, top_k=1, tolerance=bad),  # type: ignore[arg-type]
    ):
        with pytest.raises(SpecdefError, match=r"tolerance") as err:
            refuse()
        assert "\n" not in str(err.value)
