"""specdef.linalg.symmetry: the native transforms keep the function of a V/O attention pair (GQA),
a gated-MLP pair and a ReLU pair in float64 — checked against a dense forward pass written out by
hand — inflate what they claim, and are undone by their inverse; the balanced form solves its
Gram equation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdef.errors import SpecdefError
from specdef.linalg import symmetry as sym

HEADS, KV_HEADS, HEAD_DIM, D_MODEL, SEQ = 4, 2, 6, 16, 5
ALPHA = 1e4


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _parts(t: sym.PairTensors) -> list[torch.Tensor]:
    return [t.inflated, t.compensating] + ([] if t.bias is None else [t.bias])


def _attention_pair(bias: bool) -> sym.PairTensors:
    v = _randn(KV_HEADS * HEAD_DIM, D_MODEL, seed=0)
    o = _randn(D_MODEL, HEADS * HEAD_DIM, seed=1)
    return sym.PairTensors(v, _randn(KV_HEADS * HEAD_DIM, seed=2) if bias else None, o)


def _attention_out(t: sym.PairTensors, x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Oracle: multi-head attention's value/output path with fixed attention probabilities
    ``probs`` (heads × seq × seq), query head q reading KV head q // (heads / kv_heads)."""
    v, o = t.inflated.numpy(), t.compensating.numpy()
    b = np.zeros(v.shape[0]) if t.bias is None else t.bias.numpy()
    values = x @ v.T + b  # seq × kv_heads·head_dim
    out = np.zeros((x.shape[0], o.shape[0]))
    for q in range(HEADS):
        h = q // (HEADS // KV_HEADS)
        head_values = values[:, h * HEAD_DIM : (h + 1) * HEAD_DIM]
        out += probs[q] @ head_values @ o[:, q * HEAD_DIM : (q + 1) * HEAD_DIM].T
    return out


def _softmax_rows(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("bias", [False, True])
def test_attention_transform_keeps_the_function_and_inflates_each_kv_head(bias: bool) -> None:
    t = _attention_pair(bias)
    x = _randn(SEQ, D_MODEL, seed=3).numpy()
    probs = _softmax_rows(_randn(HEADS, SEQ, SEQ, seed=4).numpy())
    deformed = sym.deform_pair("attention", t, alpha=ALPHA, top_k=2, heads=HEADS, kv_heads=KV_HEADS)
    before, after = _attention_out(t, x, probs), _attention_out(deformed, x, probs)
    assert np.abs(after - before).max() <= 1e-9 * np.abs(before).max()
    for h in range(KV_HEADS):
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        s_old = np.linalg.svd(t.inflated[rows].numpy(), compute_uv=False)
        s_new = np.linalg.svd(deformed.inflated[rows].numpy(), compute_uv=False)
        np.testing.assert_allclose(s_new[:2], ALPHA * s_old[:2], rtol=1e-9)
        np.testing.assert_allclose(s_new[2:], s_old[2:], rtol=1e-8)


def test_attention_transform_is_m_per_kv_head_and_its_inverse_undoes_it() -> None:
    t = _attention_pair(bias=True)
    bases = sym.attention_bases(t, top_k=3, heads=HEADS, kv_heads=KV_HEADS)
    deformed = sym.apply_attention(t, bases, alpha=ALPHA, heads=HEADS, kv_heads=KV_HEADS)
    v, b, o = t.inflated.numpy(), t.bias.numpy(), t.compensating.numpy()  # type: ignore[union-attr]
    back_v, back_o = deformed.inflated.numpy().copy(), deformed.compensating.numpy().copy()
    back_b = deformed.bias.numpy().copy()  # type: ignore[union-attr]
    for h, basis in enumerate(bases):
        u = basis.numpy()
        np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-12)  # orthonormal
        # the top-3 left singular subspace of V_h, by numpy's SVD: same projector
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        left = np.linalg.svd(v[rows])[0][:, :3]
        np.testing.assert_allclose(u @ u.T, left @ left.T, atol=1e-9)
        m = np.eye(HEAD_DIM) + (ALPHA - 1) * u @ u.T
        np.testing.assert_allclose(
            deformed.inflated[rows].numpy(), m @ v[rows], rtol=1e-12, atol=1e-9
        )
        m_inv = np.linalg.inv(m)
        back_v[rows], back_b[rows] = m_inv @ back_v[rows], m_inv @ back_b[rows]
        for q in range(h * HEADS // KV_HEADS, (h + 1) * HEADS // KV_HEADS):
            cols = slice(q * HEAD_DIM, (q + 1) * HEAD_DIM)
            back_o[:, cols] = back_o[:, cols] @ m
    np.testing.assert_allclose(back_v, v, rtol=0, atol=1e-9 * np.abs(v).max())
    np.testing.assert_allclose(back_b, b, rtol=0, atol=1e-9 * np.abs(b).max())
    np.testing.assert_allclose(back_o, o, rtol=0, atol=1e-9 * np.abs(o).max())


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def _mlp_out(kind: str, t: sym.PairTensors, gate: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Oracle: down(silu(gate·x) ⊙ (up·x + b)) for a gated MLP, W₂·relu(W₁·x + b) for ReLU."""
    up, down = t.inflated.numpy(), t.compensating.numpy()
    hidden = x @ up.T + (0.0 if t.bias is None else t.bias.numpy())
    if kind == "gated_mlp":
        return (_silu(x @ gate.T) * hidden) @ down.T
    return np.maximum(hidden, 0.0) @ down.T


def _mlp_pair(bias: bool) -> sym.PairTensors:
    up, down = _randn(24, 10, seed=5), _randn(7, 24, seed=6)
    return sym.PairTensors(up, _randn(24, seed=7) if bias else None, down)


@pytest.mark.parametrize(("kind", "bias"), [("gated_mlp", False), ("relu_mlp", True)])
def test_mlp_transforms_keep_the_function_and_are_undone_by_their_inverse(
    kind: str, bias: bool
) -> None:
    t = _mlp_pair(bias)
    gate, x = _randn(24, 10, seed=8).numpy(), _randn(9, 10, seed=9).numpy()
    deformed = sym.deform_pair(kind, t, alpha=ALPHA, top_k=5)
    before, after = _mlp_out(kind, t, gate, x), _mlp_out(kind, deformed, gate, x)
    assert np.abs(after - before).max() <= 1e-9 * np.abs(before).max()
    # exactly the 5 rows of [W b] with the largest norms are scaled, by α (numpy's own ranking)
    aug = t.inflated.numpy() if t.bias is None else np.c_[t.inflated.numpy(), t.bias.numpy()]
    top = set(np.argsort(-np.linalg.norm(aug, axis=1))[:5].tolist())
    scale = sym.diagonal_scale(t.inflated, t.bias, alpha=ALPHA, top_k=5).numpy()
    assert {i for i, s in enumerate(scale) if s == ALPHA} == top
    assert all(s == 1.0 for i, s in enumerate(scale) if i not in top)
    back = sym.apply_diagonal(deformed, torch.from_numpy(1.0 / scale))
    for got, want in zip(_parts(back), _parts(t), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_the_oracle_sees_a_broken_symmetry() -> None:
    """The same diagonal does not commute with tanh: the dense check above can fail."""
    t = _mlp_pair(bias=True)
    x = _randn(9, 10, seed=9).numpy()
    deformed = sym.deform_pair("relu_mlp", t, alpha=ALPHA, top_k=5)

    def tanh_out(p: sym.PairTensors) -> np.ndarray:
        hidden = x @ p.inflated.numpy().T + p.bias.numpy()  # type: ignore[union-attr]
        return np.tanh(hidden) @ p.compensating.numpy().T

    assert np.abs(tanh_out(deformed) - tanh_out(t)).max() > 1e-2 * np.abs(tanh_out(t)).max()


def test_product_error_is_zero_in_float64_and_measures_rounding() -> None:
    t = _mlp_pair(bias=True)
    deformed = sym.deform_pair("gated_mlp", t, alpha=ALPHA, top_k=5)
    assert sym.product_error("gated_mlp", t, deformed) < 1e-12
    bf16 = torch.bfloat16
    rounded = sym.PairTensors(
        deformed.inflated.to(bf16),
        deformed.bias.to(bf16),
        deformed.compensating.to(bf16),  # type: ignore[union-attr]
    )
    assert 1e-4 < sym.product_error("gated_mlp", t, rounded) < 1e-1  # bfloat16: 8 bits of mantissa
    overflow = sym.PairTensors(
        deformed.inflated * 1e300 * 1e300, deformed.bias, deformed.compensating
    )
    assert sym.product_error("gated_mlp", t, overflow) == float("inf")


def test_balance_solves_the_gram_equation() -> None:
    gen = torch.Generator().manual_seed(0)
    v, b, o = (
        torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((8, 12), (8,), (12, 16))
    )
    t = sym.PairTensors(v, b, o)
    balanced = sym.balance_pair("attention", t, heads=4, kv_heads=2)
    for h in range(2):
        rows = slice(4 * h, 4 * h + 4)
        aug = torch.cat([balanced.inflated[rows], balanced.bias[rows, None]], 1)  # type: ignore[index]
        gram_o = sum(
            balanced.compensating[:, c].T @ balanced.compensating[:, c]
            for c in (slice(8 * h + 4 * g, 8 * h + 4 * g + 4) for g in range(2))
        )
        torch.testing.assert_close(aug @ aug.T, gram_o, rtol=1e-9, atol=1e-9)


def test_bad_shapes_and_kinds_are_user_errors() -> None:
    t = _attention_pair(bias=False)
    with pytest.raises(SpecdefError, match="expected heads divisible by kv_heads"):
        sym.deform_pair("attention", t, alpha=ALPHA, top_k=2, heads=3, kv_heads=2)
    with pytest.raises(SpecdefError, match=f"at most head_dim={HEAD_DIM}"):
        sym.deform_pair("attention", t, alpha=ALPHA, top_k=7, heads=HEADS, kv_heads=KV_HEADS)
    with pytest.raises(SpecdefError, match="Unknown symmetry kind 'conv'"):
        sym.deform_pair("conv", t, alpha=ALPHA, top_k=2)
