"""specdef.defense.guard: the tolerance table, the refusals before anything is deformed (tied
weights, top_k above the rank bound, NaN / Inf entries) and the precision guard's layer refusal,
whose suggested alpha is checked against a hand-built float64 deformation rounded to the dtype; and
the guard refusing a defense whose W̃ or C was corrupted (inside the step, or after it)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from _tiny import tiny_llama, tiny_qwen2, token_batch
from specdef.defense import guard
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import defended_layers
from specdef.defense.step import LayerStep
from specdef.errors import SpecdefError
from specdef.linalg import spectral


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


def _inject(
    weight: torch.Tensor,
    inflated: torch.Tensor,
    compensation: torch.Tensor,
    *,
    into: str,
    size: float,
    seed: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W̃, C) with Gaussian noise added to W̃ (``into="inflated"``) or C, scaled so that the dense
    error it adds, ‖C·ΔW̃‖_F or ‖ΔC·W̃‖_F over ‖W‖_F in float64, is ``size``; rounded back to the
    tensors' dtype."""
    gen = torch.Generator().manual_seed(seed)
    w, wt, c = weight.double(), inflated.double(), compensation.double()
    target = wt if into == "inflated" else c
    noise = torch.randn(target.shape, generator=gen, dtype=torch.float64)
    effect = c @ noise if into == "inflated" else noise @ wt
    bad = target + (size * float(torch.linalg.norm(w)) / float(torch.linalg.norm(effect))) * noise
    if into == "inflated":
        return bad.to(inflated.dtype), compensation
    return inflated, bad.to(compensation.dtype)


CORRUPTED = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("into", ["inflated", "compensation"])
def test_an_error_injected_into_the_installed_pair_is_refused(
    into: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect between the per-layer step and the model (W̃ or C of one layer corrupted after the
    step measured its own reconstruction error): the probe forward over the installed layers finds
    that layer, and only it, above the tolerance; the model is left unchanged. The same injection
    at 1 % of the tolerance passes — the refusal is the measured error, not the patching."""
    from specdef.defense import apply as apply_module

    real = apply_module.defend_layer
    size = {"value": 0.0}

    def corrupted(name: str, weight: torch.Tensor, config: SpecDefConfig, **kw: Any) -> LayerStep:
        step = real(name, weight, config, **kw)
        if name != CORRUPTED:
            return step
        pair = _inject(weight, step.inflated, step.compensation, into=into, size=size["value"])
        return dataclasses.replace(step, inflated=pair[0], compensation=pair[1])

    monkeypatch.setattr(apply_module, "defend_layer", corrupted)
    tolerance = guard.DEFAULT_TOLERANCE[torch.float32]
    config = SpecDefConfig(alpha=1e4, top_k=4, targets="all-linear")
    size["value"] = 10 * tolerance
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SpecdefError, match=rf"layer '{CORRUPTED}' has probe output gap"):
        apply_specdef_(model, config, probe=token_batch())
    assert not defended_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    forced = apply_specdef_(
        tiny_llama(), dataclasses.replace(config, force=True), probe=token_batch()
    )
    assert forced.over_tolerance == (CORRUPTED,)
    gap = {rep.name: rep.output_gap for rep in forced.layers}[CORRUPTED]
    assert gap is not None and tolerance < gap < 100 * tolerance  # the injected size, roughly
    size["value"] = tolerance / 100
    passed = apply_specdef_(tiny_llama(), config, probe=token_batch())
    assert not passed.forced


@pytest.mark.parametrize("into", ["inflated", "compensation"])
def test_an_error_injected_into_the_deformation_is_refused_without_a_probe(
    into: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect inside the per-layer step (the deformation returns a corrupted W̃ or C): its own
    reconstruction-error probe — all the guard has without a probe batch, as in streaming —
    refuses every layer; at 1 % of the tolerance it passes."""
    real = spectral.deform_with_basis
    size = {"value": 0.0}

    def corrupted(
        weight: torch.Tensor, alpha: float, basis: torch.Tensor, **kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inflated, compensation = real(weight, alpha, basis, **kw)
        return _inject(weight, inflated, compensation, into=into, size=size["value"])

    monkeypatch.setattr(spectral, "deform_with_basis", corrupted)
    tolerance = guard.DEFAULT_TOLERANCE[torch.float32]
    config = SpecDefConfig(alpha=1e4, top_k=4, targets="all-linear")
    size["value"] = 10 * tolerance
    model = tiny_llama()
    with pytest.raises(SpecdefError, match=r"has reconstruction error ‖C·W̃−W‖/‖W‖ "):
        apply_specdef_(model, config)
    assert not defended_layers(model)
    forced = apply_specdef_(tiny_llama(), dataclasses.replace(config, force=True))
    assert set(forced.over_tolerance) == {rep.name for rep in forced.layers}
    assert all(rep.reconstruction_error < 100 * tolerance for rep in forced.layers)
    size["value"] = tolerance / 100
    assert not apply_specdef_(tiny_llama(), config).forced
