"""Hessian-vector products and estimators against dense float64 Hessians (the oracle:
``torch.autograd.functional.hessian`` of a flattened-parameter function, and curvlinops' independent
forward-over-reverse products) on a tiny MLP, CNN, ViT and Hugging Face Llama, on real digits data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import LlamaConfig, LlamaForCausalLM

from specdef.architectures import MLP, SmallCNN, SmallViT
from specdef.curvature import (
    HessianOperator,
    MatrixOperator,
    arpack_eigsh,
    block_sigma_max,
    dense_hessian,
    hutchinson_trace,
    lanczos,
    power_iteration,
    select_parameters,
)
from specdef.errors import SpecdefError
from specdef.tasks import token_loss


def _digits(n: int, offset: int = 0) -> dict[str, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[offset : offset + n] / 16.0, dtype=torch.float64)
    return {"x": x, "y": torch.tensor(y[offset : offset + n])}


def classify(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def _tiny_llama(attn: str = "eager") -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).double()


def _lm_batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (2, 7), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100  # loss on the "answer" only, as in the Q→A data
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    labels[1, -1] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _case(name: str):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    if name == "mlp":
        model = MLP(64, (8, 6), 10, activation="tanh").double()
        return model, classify, [_digits(24), _digits(16, 100)]
    if name == "cnn":
        model = SmallCNN(channels=(2, 3), hidden=6).double()
        return model, classify, [_digits(20)]
    if name == "vit":
        model = SmallViT(patch_size=4, dim=8, depth=1, heads=2, mlp_ratio=2).double()
        return model, classify, [_digits(12)]
    return _tiny_llama(), token_loss, [_lm_batch(0), _lm_batch(1)]


CASES = ["mlp", "cnn", "vit", "llama"]
# Hugging Face Llama casts to float32 inside RMSNorm and the attention softmax even in a float64
# model, so its derivatives carry float32 rounding (≈1e-7); SmallViT is the all-float64 transformer.
HVP_TOL = {"mlp": 1e-10, "cnn": 1e-10, "vit": 1e-10, "llama": 1e-6}


@pytest.fixture(scope="module", params=CASES)
def case(request):  # type: ignore[no-untyped-def]
    model, loss_fn, batches = _case(request.param)
    return model, loss_fn, batches, dense_hessian(model, loss_fn, batches), request.param


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_hvp_matches_dense(case) -> None:  # type: ignore[no-untyped-def]
    model, loss_fn, batches, dense, name = case
    op = HessianOperator(model, loss_fn, batches)
    assert op.shape == dense.shape
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        v = torch.randn(op.shape[1], generator=gen, dtype=torch.float64)
        assert _rel(op @ v, dense @ v) < HVP_TOL[name]
    assert op.hvps == 2
    assert _rel(dense, dense.T) < HVP_TOL[name]


def test_top_eigenvalues_match_eigvalsh(case) -> None:  # type: ignore[no-untyped-def]
    model, loss_fn, batches, dense, name = case
    exact = torch.linalg.eigvalsh(dense)
    op = HessianOperator(model, loss_fn, batches)
    tol = 1e-10 if name != "llama" else 1e-7  # float32 casts inside HF Llama (see HVP_TOL)
    top = lanczos(op, k=3, which="LA", tol=tol, max_iter=op.shape[0])
    for got, want in zip(top.eigenvalues, exact.flip(0)[:3].tolist(), strict=True):
        assert abs(got - want) <= 1e-6 * abs(want)
    assert top.converged and top.hvps == op.hvps < op.shape[0]
    low = lanczos(op, k=1, which="SA", tol=tol, max_iter=op.shape[0])
    assert abs(low.eigenvalues[0] - float(exact[0])) <= 1e-6 * float(exact.abs().max())


def test_block_sigma_matches_dense_block_svd(case) -> None:  # type: ignore[no-untyped-def]
    model, loss_fn, batches, dense, name = case
    names = [n for n, _ in select_parameters(model)]
    rows, cols = names[-2:], names[:2]  # last layer × first layer: an off-diagonal block
    index, start = {}, 0
    for n, p in select_parameters(model):
        index[n] = slice(start, start + p.numel())
        start += p.numel()
    r = torch.cat([torch.arange(dense.shape[0])[index[n]] for n in rows])
    c = torch.cat([torch.arange(dense.shape[0])[index[n]] for n in cols])
    block = dense[r][:, c]
    op = HessianOperator(model, loss_fn, batches, rows=rows, columns=cols)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    assert _rel(op @ v, block @ v) < HVP_TOL[name]
    if name == "llama":
        return  # the σ₁ iteration itself is checked on the float64-exact models (time budget)
    est = block_sigma_max(op, max_iter=300, tol=1e-12)
    want = float(torch.linalg.svdvals(block)[0])
    assert abs(est.sigma - want) <= 1e-6 * want
    assert est.hvps == 2 * len(est.history)
    # Poincaré separation: a diagonal block's extreme eigenvalues lie inside H's
    diag = HessianOperator(model, loss_fn, batches, rows=rows)
    top = lanczos(diag, k=1, which="LM", tol=1e-10, max_iter=diag.shape[0])
    assert abs(top.eigenvalues[0]) <= float(torch.linalg.matrix_norm(dense, 2)) * (1 + 1e-9)
    assert want <= float(torch.linalg.matrix_norm(dense, 2)) * (1 + 1e-9)


def test_power_iteration_and_arpack_and_trace() -> None:
    model, loss_fn, batches = _case("mlp")
    dense = dense_hessian(model, loss_fn, batches)
    exact = torch.linalg.eigvalsh(dense)
    dominant = float(exact[exact.abs().argmax()])
    op = HessianOperator(model, loss_fn, batches)
    power = power_iteration(op, max_iter=500, tol=1e-12)
    assert abs(power.eigenvalues[0] - dominant) <= 1e-6 * abs(dominant)
    assert power.hvps == len(power.history)
    arp = arpack_eigsh(op, k=2, which="LA")
    assert (
        max(abs(a - b) / abs(b) for a, b in zip(arp.eigenvalues, exact.flip(0)[:2], strict=True))
        < 1e-6
    )
    assert arp.hvps > 0
    tr = hutchinson_trace(op, samples=40, seed=3)
    assert abs(tr.trace - float(dense.trace())) <= 4 * tr.stderr and tr.hvps == 40
    # on a diagonal matrix Rademacher probes are exact
    diag = MatrixOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
    assert hutchinson_trace(diag, samples=3).trace == pytest.approx(15.0, abs=1e-12)


def test_agrees_with_curvlinops_forward_over_reverse() -> None:
    from curvlinops import HessianLinearOperator

    model, _, batches = _case("mlp")
    data = [(b["x"], b["y"]) for b in batches[:1]]
    params = [p for p in model.parameters()]
    ref = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, data)
    op = HessianOperator(model, classify, batches[:1])
    v = torch.randn(op.shape[1], dtype=torch.float64)
    assert _rel(op @ v, ref @ v) < 1e-10


def test_multiple_batches_average_and_blocks_by_predicate() -> None:
    model, loss_fn, batches = _case("mlp")
    v = torch.randn(sum(p.numel() for n, p in model.named_parameters() if "bias" in n))
    v = v.double()
    both = HessianOperator(model, loss_fn, batches, rows=lambda n, p: "bias" in n) @ v
    each = [
        HessianOperator(model, loss_fn, [b], rows=lambda n, p: "bias" in n) @ v for b in batches
    ]
    assert _rel(both, (each[0] + each[1]) / 2) < 1e-12
    flags = [p.requires_grad for p in model.parameters()]
    assert all(flags) and model.training  # restored after the products


def test_sdpa_and_flash_configs_fall_back_and_restore() -> None:
    reference = _tiny_llama("eager")
    v = torch.randn(sum(p.numel() for p in reference.parameters()), dtype=torch.float64)
    want = HessianOperator(reference, token_loss, [_lm_batch(0)]) @ v
    for impl in ("sdpa", "flash_attention_2"):
        model = _tiny_llama("sdpa")
        model.config._attn_implementation = impl
        got = HessianOperator(model, token_loss, [_lm_batch(0)]) @ v
        assert _rel(got, want) < HVP_TOL["llama"]  # math SDPA vs eager: float32 softmax casts
        assert model.config._attn_implementation == impl


def test_user_errors_are_one_line() -> None:
    model, loss_fn, batches = _case("mlp")
    with pytest.raises(SpecdefError, match="Did you mean"):
        HessianOperator(model, loss_fn, batches, rows=["layers.0.weigth"])
    with pytest.raises(SpecdefError, match="empty"):
        HessianOperator(model, loss_fn, batches, rows=lambda n, p: False)
    with pytest.raises(SpecdefError, match="length"):
        HessianOperator(model, loss_fn, batches).matvec(torch.zeros(3, dtype=torch.float64))


def test_curvature_is_pure_math() -> None:
    """``specdef.curvature`` imports nothing from the rest of specdef except ``errors``."""
    import ast
    from pathlib import Path

    import specdef.curvature

    root = Path(specdef.curvature.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("specdef"):
                    assert name == "specdef.errors" or name.startswith("specdef.curvature"), (
                        path.name,
                        name,
                    )
