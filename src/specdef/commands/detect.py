"""``specdef detect MODEL``: find SpecDef layers from the weights alone (no manifest is read)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from specdef.commands._common import print_json, print_table


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "detect",
        help="find defended layers and their compensation pairs from the weights alone",
        description="Scan a checkpoint's raw safetensors tensors (a Hugging Face directory, a "
        "defended directory — its manifest is never read — or a .safetensors file) or a zoo model, "
        "and report which layers look deformed and which pairs compensate each other, with the "
        "evidence: the compensation's two-value spectrum, the inflated layer's top-k gap, the "
        "alignment of its top-k subspace with the compensation, and the conditioning of each "
        "factor against their product.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="checkpoint directory, .safetensors file or zoo name"
    )
    parser.add_argument("--all", action="store_true", help="also list every scanned layer")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specdef.detect import detect_checkpoint, detect_model

    path = Path(args.model)
    if path.exists():
        found = detect_checkpoint(path)
    else:
        from specdef.release import load_source

        found = detect_model(load_source(args.model).model)
    if args.json:
        print_json(found.to_dict())
        return 0
    if found.pairs:
        print_table(
            f"compensation pairs in {args.model}",
            ["inflated", "compensation", "k", "α (est.)", "alignment", "σk/σk+1 W̃", "σk/σk+1 C·W̃",
             "σ1(W̃)/σ1(C·W̃)", "cond W̃", "cond C", "cond C·W̃"],
            [(p.inflated + (" (n×m)" if p.transposed else ""), p.compensation, p.top_k, p.alpha,
              p.alignment, p.top_gap, p.product_gap, p.sigma1_ratio, p.cond_inflated,
              p.cond_compensation, p.cond_product) for p in found.pairs],
        )  # fmt: skip
    if found.unpaired_compensations:
        print_table(
            "compensation-like layers without a partner",
            ["layer", "m", "k", "α (est.)", "symmetry error", "cluster spread"],
            [(c.name, c.size, c.top_k, c.alpha, c.symmetry_error, c.cluster_spread)
             for c in found.unpaired_compensations],
        )  # fmt: skip
    if found.suspects:
        print_table(
            "unpaired suspects (an α-sized top singular-value gap, no compensation found)",
            ["layer", "shape", "k", "σk/σk+1", "cond"],
            [(s.name, "×".join(map(str, s.shape)), s.gap_index, s.gap, s.cond)
             for s in found.suspects],
        )  # fmt: skip
    if args.all:
        print_table(
            "every scanned layer",
            ["layer", "shape", "role", "largest gap σi/σi+1", "at i", "cond"],
            [(s.name, "×".join(map(str, s.shape)), s.role, s.gap, s.gap_index, s.cond)
             for s in found.layers],
        )  # fmt: skip
    print(
        f"{len(found.pairs)} pairs, {len(found.unpaired_compensations)} unpaired compensations, "
        f"{len(found.suspects)} suspects among {len(found.layers)} 2-D weights"
        + ("" if found.found_anything else ": no sign of SpecDef")
    )
    return 0
