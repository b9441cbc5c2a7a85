"""Precision limit of SpecDef: reconstruction error ‖C·W̃ − W‖/‖W‖ vs α in each dtype, measured.

Two weights: a real trained one (SmolLM2-135M ``model.layers.0.mlp.gate_proj``, 1536×576, from the
zoo) and a Gaussian 576×1536 one; k = 25, exact subspace. W̃ and C are rounded to the dtype and
multiplied in it, as the model runs. Then the whole SmolLM2 model (``preset:llama``, k = 25) at a
few α in float32 and bfloat16: the relative logit gap max|Δ| / max|logit| on a probe text, with the
guard forced off so the broken cases can be measured. Also the largest α the guard accepts per dtype.

Rewrites the table between the ``precision-table`` markers of ``docs/precision.md``.

Run: ``.venv/bin/python benchmarks/precision_table.py`` (≈2–4 min on 2 cores; add ``--no-model``
to skip the SmolLM2 model-level rows).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "precision.md"
START, END = "<!-- precision-table:start -->", "<!-- precision-table:end -->"
ALPHAS = (1.5, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e9)
MODEL_ALPHAS = (1e2, 1e4, 1e6, 1e9)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
TOP_K = 25


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt(x: float) -> str:
    return "inf (overflow)" if math.isinf(x) else f"{x:.1e}"


def weight_table(weights: dict[str, torch.Tensor]) -> list[str]:
    from specdef.defense.guard import DEFAULT_TOLERANCE
    from specdef.linalg.spectral import (
        deform_with_basis,
        max_safe_alpha,
        reconstruction_error,
        top_subspace,
    )

    lines = []
    for label, weight in weights.items():
        basis = top_subspace(weight, TOP_K)
        lines += [
            f"**{label}** ({weight.shape[0]}×{weight.shape[1]}, k = {TOP_K}): "
            "‖C·W̃ − W‖/‖W‖ in each dtype",
            "",
            "| dtype | " + " | ".join(f"α={a:g}" for a in ALPHAS) + " | tolerance | largest α "
            "within it |",
            "|---|" + "---|" * (len(ALPHAS) + 2),
        ]
        pairs = {a: deform_with_basis(weight, a, basis) for a in ALPHAS}
        for dtype in DTYPES:
            errs = [reconstruction_error(weight, *pairs[a], dtype=dtype) for a in ALPHAS]
            tol = DEFAULT_TOLERANCE[dtype]
            safe = max_safe_alpha(weight, basis, dtype=dtype, tolerance=tol, start=1e9)
            lines.append(
                f"| {_short(dtype)} | " + " | ".join(_fmt(e) for e in errs) + f" | {tol:g} | "
                f"≈{safe:g} |"
            )
        lines.append("")
        print("\n".join(lines[-len(DTYPES) - 5 :]), flush=True)
    return lines


def model_table() -> list[str]:
    from specdef import zoo
    from specdef.defense.apply import apply_specdef_, undo_specdef_
    from specdef.defense.config import SpecDefConfig
    from specdef.defense.probe import max_abs_diff, model_output
    from specdef.release.sources import probe_batch

    lines = [
        f"**SmolLM2-135M, `preset:llama` (90 layers), k = {TOP_K}, randomized**: relative logit gap "
        "max|Δ| / max|logit| on the probe text (guard forced off to measure broken cases)",
        "",
        "| dtype | " + " | ".join(f"α={a:g}" for a in MODEL_ALPHAS) + " |",
        "|---|" + "---|" * len(MODEL_ALPHAS),
    ]
    tokenizer = zoo.load_tokenizer("smollm2-135m")
    for dtype in (torch.float32, torch.bfloat16):
        model = zoo.load_model("smollm2-135m", dtype=dtype)
        batch = probe_batch(model, tokenizer)
        ref = model_output(model, batch)
        cells = []
        for alpha in MODEL_ALPHAS:
            config = SpecDefConfig(
                alpha=alpha, top_k=TOP_K, targets="preset:llama", method="randomized", force=True
            )
            apply_specdef_(model, config)
            out = model_output(model, batch)
            gap = max_abs_diff(out, ref) / float(ref.abs().max())
            cells.append(_fmt(gap if math.isfinite(gap) else math.inf))
            undo_specdef_(model)
            model = zoo.load_model("smollm2-135m", dtype=dtype)  # undo rounds W; start clean
        lines.append(f"| {_short(dtype)} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-model", action="store_true", help="skip the SmolLM2 model rows")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("specdef.defense.apply").setLevel(
        logging.ERROR
    )  # force=True is intended here
    from specdef.utils.files import replace_marked_region

    weights: dict[str, torch.Tensor] = {}
    try:
        from specdef import zoo

        smol = zoo.load_model("smollm2-135m")
        weights["SmolLM2 layers.0.mlp.gate_proj"] = (
            smol.get_submodule("model.layers.0.mlp.gate_proj").weight.detach().clone()
        )
        del smol
    except Exception as err:  # the zoo model is optional for the weight table
        print(f"SmolLM2 unavailable ({err}); Gaussian weight only", file=sys.stderr)
        args.no_model = True
    gen = torch.Generator().manual_seed(0)
    weights["Gaussian N(0, 0.02²)"] = torch.randn(576, 1536, generator=gen) * 0.02
    lines = [START, "", "Generated by `python benchmarks/precision_table.py`.", ""]
    lines += weight_table(weights)
    if not args.no_model:
        lines += model_table()
    lines.append(END)
    replace_marked_region(DOC, START, END, "\n".join(["", *lines[1:-1], ""]))
    print(f"wrote the table into {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
