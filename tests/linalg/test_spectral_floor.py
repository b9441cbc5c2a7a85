"""The per-layer math at the compute floor (issue 18): the deformed spectrum from the computed basis,
the probe estimate of the reconstruction error, σ₁ from the Gram matrix, the finiteness check, and
the defended tensors against a verbatim copy of the previous implementation."""

from __future__ import annotations

import math

import pytest
import torch

from specdef import zoo
from specdef.defense.layer import DefendedLinear
from specdef.linalg.spectral import (
    all_finite,
    deform_with_basis,
    deformed_spectrum,
    largest_singular_value,
    probe_reconstruction_error,
    reconstruction_error,
    top_subspace,
    top_subspace_and_values,
)


def _decaying(m: int, n: int, seed: int, *, gap: bool = False) -> torch.Tensor:
    """float64 m×n with a power-law spectrum (σ_i ∝ i^-1/2, like a trained layer's) or a clear gap
    after the 6th value; singular vectors from QR of Gaussians."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    left, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    s = torch.arange(1, r + 1, dtype=torch.float64).pow(-0.5)
    if gap:
        s[6:] *= 0.1
    return (left * s) @ right.T


@pytest.mark.parametrize("shape", [(40, 70), (70, 40), (30, 30)])
def test_deformed_spectrum_is_the_svd_of_the_inflated_weight_exact(shape: tuple[int, int]) -> None:
    w = _decaying(*shape, seed=0)
    alpha, k = 1e3, 6
    basis, sigma = top_subspace_and_values(w, k, method="exact")
    inflated, _ = deform_with_basis(w, alpha, basis)
    oracle = torch.linalg.svdvals(inflated)  # a separate decomposition of W̃
    got = deformed_spectrum(sigma, alpha, k)
    torch.testing.assert_close(got, oracle, rtol=0, atol=1e-12 * float(oracle[0]))
    assert torch.equal(got[k:], sigma[k:])  # the tail is unchanged, bit for bit


def test_deformed_spectrum_randomized_is_the_projection_on_the_sketch() -> None:
    """For the randomized basis the values are α·σ(U_kᵀW) on the top k (exactly, the derivation in
    the docstring) and within Weyl's ‖(I − P)W‖₂ of the true σ_i(W̃)."""
    w = _decaying(120, 90, seed=1, gap=True)
    alpha, k = 1e4, 6
    gen = torch.Generator().manual_seed(0)
    basis, sigma = top_subspace_and_values(w, k, method="randomized", generator=gen)
    inflated, _ = deform_with_basis(w, alpha, basis)
    got = deformed_spectrum(sigma, alpha, k)
    assert len(got) == k + 10
    on_sketch = torch.linalg.svdvals(basis.T @ inflated)
    torch.testing.assert_close(got[:k], on_sketch, rtol=1e-12, atol=0)
    residual = w - basis @ (basis.T @ w)
    weyl = float(torch.linalg.matrix_norm(residual, ord=2))
    true = torch.linalg.svdvals(inflated)[:k]
    assert float((got[:k] - true).abs().max()) <= weyl * (1 + 1e-9)
    # the tail is the sketch's estimate of W's: below the true values (interlacing for QᵀW), and
    # with this gap close to them right after the top k
    exact = torch.linalg.svdvals(w)[k : k + 10]
    assert bool((got[k:] <= exact * (1 + 1e-12)).all())
    torch.testing.assert_close(got[k : k + 2], exact[:2], rtol=1e-3, atol=0)


def _effective_rank(a: torch.Tensor) -> float:
    s2 = torch.linalg.svdvals(a.double()) ** 2
    return float(s2.sum() ** 2 / (s2**2).sum())


def test_probe_is_within_its_stated_bound_of_the_dense_storage_error() -> None:
    """In float64 on the rounded tensors the probe estimates the dense ‖C_dW̃_d − W‖/‖W‖; check the
    docstring's Laurent–Massart lower bound (x = ln 200) and a matching upper bound, over seeds."""
    w = _decaying(96, 160, seed=2)
    basis = top_subspace(w, 8)
    for dtype in (torch.float32, torch.bfloat16):
        inflated, comp = (t.to(dtype) for t in deform_with_basis(w, 1e4, basis))
        dense = reconstruction_error(w, inflated, comp, dtype=torch.float64)
        error = comp.double() @ inflated.double() - w
        p, x = 16, math.log(200)
        r_e, r_w = _effective_rank(error), _effective_rank(w)
        lower = math.sqrt(
            (1 - 2 * math.sqrt(x / (p * r_e)))
            / (1 + 2 * math.sqrt(x / (p * r_w)) + 2 * x / (p * r_w))
        )
        upper = math.sqrt(
            (1 + 2 * math.sqrt(x / (p * r_e)) + 2 * x / (p * r_e))
            / (1 - 2 * math.sqrt(x / (p * r_w)))
        )
        ratios = [
            probe_reconstruction_error(w, inflated, comp, dtype=torch.float64, seed=s) / dense
            for s in range(40)
        ]
        assert lower > 0.5 and upper < 2.0  # the bound is informative for these ranks
        inside = sum(lower <= r <= upper for r in ratios)
        assert inside >= 38, (dtype, lower, upper, ratios)  # ≥ 98 % expected, ≥ 95 % required
        assert abs(sum(r * r for r in ratios) / len(ratios) - 1) < 0.1  # unbiased in the square


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_in_dtype_is_never_looser_than_the_dense_product(dtype: torch.dtype) -> None:
    """In the stored dtype the probe also counts the rounding of W̃·x at scale α·σ₁ (the model's
    forward does too): on power-law matrices of tiny-llama's layer shapes it stays within 1–3× the dense
    in-dtype error — stricter, never looser — across α where the error is between 1e-4 and 10."""
    w_all = [_decaying(48, 48, seed=3), _decaying(24, 48, seed=4), _decaying(80, 48, seed=5)]
    alphas = (1e6, 1e8) if dtype == torch.float32 else (1e2, 1e3)
    for w in w_all:
        basis = top_subspace(w, 4)
        for alpha in alphas:
            inflated, comp = deform_with_basis(w, alpha, basis)
            dense = reconstruction_error(w, inflated, comp, dtype=dtype)
            probe = probe_reconstruction_error(w, inflated, comp, dtype=dtype)
            assert 1e-4 < dense < 10
            assert 1.0 <= probe / dense <= 3.0, (tuple(w.shape), alpha, probe, dense)


def test_probe_reports_overflow_and_an_exact_pair() -> None:
    w = _decaying(8, 8, seed=6)
    basis = top_subspace(w, 2)
    inflated, comp = deform_with_basis(w, 1e6, basis)
    assert math.isinf(probe_reconstruction_error(w, inflated, comp, dtype=torch.float16))
    exact = torch.eye(8, dtype=torch.float64)
    assert probe_reconstruction_error(w, w, exact) == 0.0


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (1, 7), (7, 1)])
def test_largest_singular_value_equals_the_svd(shape: tuple[int, int]) -> None:
    w = _decaying(*shape, seed=7) * 1e3
    oracle = float(torch.linalg.svdvals(w)[0])
    assert largest_singular_value(w) == pytest.approx(oracle, rel=1e-13)
    assert largest_singular_value(torch.zeros(3, 4)) == 0.0


def test_all_finite_matches_the_elementwise_check() -> None:
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(13, 7).to(dtype)
        assert all_finite(t)
        for bad in (math.nan, math.inf, -math.inf):
            u = t.clone()
            u[3, 2] = bad
            assert not all_finite(u)
    big = torch.full((4, 4), 1e308, dtype=torch.float64)  # finite entries whose sum overflows
    assert all_finite(big)
    big[0, 0] = -math.inf
    assert not all_finite(big)
    assert all_finite(torch.full((4, 4), 65504.0, dtype=torch.float16))


def test_defended_linear_starts_from_zeros() -> None:
    layer = DefendedLinear(5, 3, bias=True, alpha=10.0, top_k=1)
    assert all(bool((p == 0).all()) for p in layer.parameters())


# --- the previous implementation, verbatim (commit 06229b0), for the equality check ------------
def _old_top_subspace(w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    w = w.detach().to(dtype=torch.float64)
    n = w.shape[1]
    omega = torch.randn(n, k + 10, dtype=torch.float64, generator=gen, device="cpu")
    q, _ = torch.linalg.qr(w @ omega)
    for _ in range(4):
        z, _ = torch.linalg.qr(w.T @ q)
        q, _ = torch.linalg.qr(w @ z)
    u_small, _, _ = torch.linalg.svd(q.T @ w, full_matrices=False)
    basis, r = torch.linalg.qr(q @ u_small[:, :k])
    return basis * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _old_deform(
    w: torch.Tensor, alpha: float, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().to(dtype=torch.float64)
    inflated = (u @ (u.T @ w)).mul_(alpha - 1.0).add_(w)
    compensation = (u @ u.T).mul_(1.0 / alpha - 1.0)
    compensation.diagonal().add_(1.0)
    return inflated, compensation


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def test_defended_tensors_equal_the_previous_implementation_on_real_weights() -> None:
    """The trained digits MLP (zoo) and SmolLM2-shaped matrices, both methods, stored in float32:
    W̃ and C equal the old algorithm's to ≲ 1e-6 relative (float32 rounding is 6e-8)."""
    model = zoo.load_model("mlp-digits")
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights += [_decaying(192, 576, seed=8).float(), _decaying(576, 192, seed=9).float()]
    for i, weight in enumerate(weights):
        k = min(8, min(weight.shape) - 1)
        for method in ("exact", "randomized"):
            if method == "exact":
                basis_old = torch.linalg.svd(weight.double(), full_matrices=False)[0][:, :k]
            else:
                basis_old = _old_top_subspace(weight, k, torch.Generator().manual_seed(i))
            basis_new = top_subspace(
                weight, k, method=method, generator=torch.Generator().manual_seed(i)
            )
            old = _old_deform(weight, 1e4, basis_old)
            new = deform_with_basis(weight, 1e4, basis_new)
            for a, b in zip(new, old, strict=True):
                assert _relative(a.float(), b.float()) < 1e-6, (i, method, _relative(a, b))
