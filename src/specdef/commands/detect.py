"""``specdef detect MODEL``: find SpecDef layers from the weights alone (no manifest is read)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from specdef.commands.common import add_device_option, add_threads_option, print_json, print_table
from specdef.informed.detect import DetectConfig, detect_checkpoint, detect_model
from specdef.release.sources import load_source


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "detect",
        help="find defended layers and their compensation pairs from the weights alone",
        description="Scan a checkpoint's raw safetensors tensors (a Hugging Face directory, a "
        "defended directory — its manifest's defense record is never read — or a .safetensors "
        "file) or a zoo model, and report which layers look deformed and which pairs compensate "
        "each other, with the "
        "evidence: the compensation's two-value spectrum, the inflated layer's top-k gap, the "
        "alignment of its top-k subspace with the compensation, and the conditioning of each "
        "factor against their product. Native deformation (specdef defend --mode native, no "
        "compensation layer) is found by scoring every symmetric pair (attention V/O, gated-MLP "
        "up/down, Linear→ReLU→Linear) with its imbalance: log10 of the largest factor the "
        "balancing transform would apply (≈ log10 α for a deformed pair). This needs the "
        "architecture: a zoo name, or a directory with config.json (or a specdef checkpoint of "
        "specdef's own architectures).",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="checkpoint directory, .safetensors file or zoo name"
    )
    parser.add_argument(
        "--native-threshold",
        type=float,
        default=None,
        metavar="LOG10",
        help="imbalance (log10) from which a symmetric pair counts as natively deformed "
        "(default 1.0: measured ≤ 0.53 on undefended models, ≥ 1.9 at α = 1e2; docs/attacks.md)",
    )
    parser.add_argument(
        "--all", action="store_true", help="also list every scanned layer and symmetric pair"
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    add_threads_option(parser)
    add_device_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    config = DetectConfig(
        **({} if args.native_threshold is None else {"native_threshold": args.native_threshold})
    )
    path = Path(args.model)
    if path.exists():
        found = detect_checkpoint(path, config=config)
    else:
        found = detect_model(load_source(args.model, device=args.device).model, config=config)
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
    native = found.native or []
    shown = native if args.all else found.native_deformed
    if shown:
        print_table(
            ("every symmetric pair" if args.all else "natively deformed symmetric pairs")
            + f" (deformed: imbalance ≥ {found.native_threshold:g})",
            ["inflated", "compensating", "kind", "imbalance (log10)", "balance factor",
             "deformed"],
            [(p.inflated, p.compensating, p.kind, p.imbalance_log10, p.balance_factor,
              "yes" if p.deformed else "no") for p in shown],
        )  # fmt: skip
    if args.all:
        print_table(
            "every scanned layer",
            ["layer", "shape", "role", "largest gap σi/σi+1", "at i", "cond"],
            [(s.name, "×".join(map(str, s.shape)), s.role, s.gap, s.gap_index, s.cond)
             for s in found.layers],
        )  # fmt: skip
    native_line = (
        "native deformation not checked (architecture unknown: pass a zoo name, a directory "
        "with a config.json transformers can build, or weights saved by specdef, whose header "
        "names a specdef architecture)"
        if found.native is None
        else f"{len(found.native_deformed)} of {len(native)} symmetric pairs natively deformed"
    )
    print(
        f"{len(found.pairs)} pairs, {len(found.unpaired_compensations)} unpaired compensations, "
        f"{len(found.suspects)} suspects among {len(found.layers)} 2-D weights; {native_line}"
        + ("" if found.found_anything else ": no sign of SpecDef")
    )
    return 0
