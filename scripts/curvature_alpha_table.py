"""σ₁(H) of a tiny defended MLP vs α: exact (dense float64 Hessian), the Rayleigh/Ritz certificate
and the weight-spectrum bound; also which directions carry the growth. Rewrites the table section
of ``docs/theory.md``.

    .venv/bin/python scripts/curvature_alpha_table.py [--no-write]

Model: MLP 64→16→16→10 (tanh) trained 300 Adam steps on scikit-learn digits (float64), middle
layer ``layers.2`` defended with top_k = 2; Hessian on 128 held-out digits.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from specdef.architectures import MLP
from specdef.curvature import HessianOperator, dense_hessian, select_parameters
from specdef.curvature.certificates import rayleigh_certificate, top_singular_triplets
from specdef.defense.apply import apply_specdef_
from specdef.defense.certify import defense_certificate, spectral_lower_bound
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import DefendedLinear, set_submodule

ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4)
LAYER, TOP_K = "layers.2", 2
DOC = Path(__file__).resolve().parents[1] / "docs" / "theory.md"
BEGIN, END = "<!-- alpha-table:begin -->", "<!-- alpha-table:end -->"


def classify(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def trained_mlp(steps: int = 300) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = MLP(64, (16, 16), 10, activation="tanh").double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 1500, (64,), generator=gen)
        opt.zero_grad()
        classify(model, {"x": x[idx], "y": y[idx]}).backward()
        opt.step()
    return model, [{"x": x[1500:1628], "y": y[1500:1628]}]


def defended(model: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """α > 1 through ``apply_specdef_``; α = 1 is the identity slot (W̃ = W, C = I) by hand."""
    out = copy.deepcopy(model)
    if alpha > 1:
        apply_specdef_(out, SpecDefConfig(alpha=alpha, top_k=TOP_K, targets=(LAYER,)))
        return out
    set_submodule(out, LAYER, DefendedLinear.identity_slot(out.get_submodule(LAYER), top_k=TOP_K))
    return out


def probe_directions(model: torch.nn.Module, batches: list) -> dict[str, float]:
    """|vᵀHv| for three unit directions: in C along ũ₁ũ₁ᵀ, in W̃ along ũ₁ṽ₁ᵀ, in C along ũ₁w⊥ᵀ."""
    layer = model.get_submodule(LAYER)
    u, _, v = top_singular_triplets(layer.inflated.weight, TOP_K + 1)
    names = [f"{LAYER}.compensation.weight", f"{LAYER}.inflated.weight"]
    op = HessianOperator(model, classify, batches, rows=names)
    dirs = []
    offsets, start = {}, 0
    for pname, p in op.rows:  # module order: inflated before compensation
        offsets[pname] = start
        start += p.numel()
    for block, mat in ((0, torch.outer(u[:, 0], u[:, 0])), (1, torch.outer(u[:, 0], v[:, 0])),
                       (0, torch.outer(u[:, 0], u[:, TOP_K]))):  # fmt: skip
        flat = torch.zeros(op.shape[0], dtype=torch.float64)
        at = offsets[names[block]]
        flat[at : at + mat.numel()] = mat.reshape(-1)
        dirs.append(flat)
    cert = rayleigh_certificate(op, dirs)
    return dict(
        zip(("C_u1u1", "Wt_u1v1", "C_u1wperp"), (abs(r) for r in cert.rayleigh), strict=True)
    )


def measure() -> list[dict[str, float]]:
    torch.set_num_threads(2)
    base, batches = trained_mlp()
    rows = []
    for alpha in ALPHAS:
        model = defended(base, alpha)
        dense = dense_hessian(model, classify, batches)
        eig = torch.linalg.eigvalsh(dense)
        exact = float(eig.abs().max())
        index, start = {}, 0
        for pname, p in select_parameters(model):
            index[pname] = slice(start, start + p.numel())
            start += p.numel()
        cross = dense[index[f"{LAYER}.compensation.weight"], index["layers.0.weight"]]
        spectral = spectral_lower_bound(model, classify, batches, top=TOP_K)
        cert = defense_certificate(model, classify, batches, top=TOP_K, spectral=spectral)
        rows.append({
            "alpha": alpha, "exact": exact, "lambda_max": float(eig[-1]),
            "certificate": cert.value, "certificate_hvps": cert.hvps,
            "bound": spectral.value, "bound_products": spectral.products,
            "kappa": spectral.pairs[0].bound.kappas[0],
            "sigma_inflated": spectral.pairs[0].sigma_inflated, **probe_directions(model, batches),
            "cross": float(torch.linalg.svdvals(cross)[0]),
        })  # fmt: skip
    return rows


def render(rows: list[dict[str, float]]) -> str:
    head = (
        "| α | exact σ₁(H) | certificate (HVPs) | weight-spectrum bound | σ₁(W̃) | κ₁ "
        "| \\|Hv·v\\| C ũ₁ũ₁ᵀ | \\|Hv·v\\| W̃ ũ₁ṽ₁ᵀ | \\|Hv·v\\| C ũ₁w⊥ᵀ | σ₁(H[C, W₀]) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['alpha']:g} | {r['exact']:.4g} | {r['certificate']:.4g} ({r['certificate_hvps']}) "
        f"| {r['bound']:.4g} | {r['sigma_inflated']:.4g} | {r['kappa']:.4g} | {r['C_u1u1']:.4g} "
        f"| {r['Wt_u1v1']:.3g} | {r['C_u1wperp']:.3g} | {r['cross']:.4g} |\n"
        for r in rows
    )
    ratios = []
    for key in ("exact", "certificate", "bound", "cross"):
        growth = [rows[i + 1][key] / rows[i][key] for i in range(len(rows) - 1)]
        ratios.append(f"{key}: " + ", ".join(f"{g:.3g}" for g in growth))
    note = "\nGrowth per ×10 in α — " + "; ".join(ratios) + ".\n"
    return head + body + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rows = measure()
    for r in rows:
        ok = r["certificate"] <= r["exact"] * (1 + 1e-9) and r["bound"] <= r["exact"] * (1 + 1e-9)
        if not ok or not all(math.isfinite(v) for v in r.values()):
            print(f"bound above exact at alpha={r['alpha']}: {r}", file=sys.stderr)
            return 1
    table = render(rows)
    print(table)
    if not args.no_write:
        text = DOC.read_text(encoding="utf-8")
        if BEGIN not in text:
            print(f"{DOC} has no {BEGIN} marker", file=sys.stderr)
            return 1
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), BEGIN + "\n" + table + END,
                     text, flags=re.S)  # fmt: skip
        DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
