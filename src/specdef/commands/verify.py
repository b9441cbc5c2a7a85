"""``specdef verify SRC OUT``: check a defended checkpoint computes the source model's function."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from specdef.commands.common import (
    add_device_option,
    add_threads_option,
    fmt,
    print_json,
    print_table,
)
from specdef.defense.guard import check_tolerance
from specdef.errors import SpecdefError
from specdef.io.checkpoint import MANIFEST, NATIVE_RECORD, model_dtype
from specdef.release.sources import load_source
from specdef.release.verify import verify


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "verify",
        help="compare a defended checkpoint with its source model",
        description="Load SRC and OUT, compare their outputs on a probe batch (max absolute / "
        "relative difference), for language models also greedy generations and perplexity on a "
        "probe text; show spectra and parameter overhead. Exit 0 only within tolerance (1 if not).",
    )
    parser.add_argument("src", metavar="SRC", help="the original model (directory or zoo name)")
    parser.add_argument(
        "out",
        metavar="OUT",
        help="the defended directory (Algorithm 1 checkpoint or native release)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        help="bound on max |Δoutput| / max |output| (default: per dtype, as the guard)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of a random probe batch")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_threads_option(parser)
    add_device_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_tolerance(args.tolerance, name="--tolerance")  # before loading either model
    out = Path(args.out)
    if not (out / MANIFEST).exists() and not (out / NATIVE_RECORD).exists():
        raise SpecdefError(
            f"{args.out!r} is not a specdef release: it has neither {MANIFEST} (Algorithm 1) nor "
            f"{NATIVE_RECORD} (native); pass the -o directory of `specdef defend`."
        )
    defended = load_source(args.out, device=args.device)
    # the source in the release's dtype, so the gap is the defense's, not a cast's
    original = load_source(args.src, dtype=model_dtype(defended.model), device=args.device)
    result = verify(original, defended, tolerance=args.tolerance, seed=args.seed)
    if args.json:
        print_json(result.to_dict())
        return 0 if result.passed else 1
    print_table(
        "Spectra of the defended layers",
        ["layer", "m×n", "k", "σ1 before", "σ1 after", "ratio", "σk+1 before", "σk+1 after"],
        [
            (
                r["layer"],
                r["shape"],
                r["top_k"],
                r.get("sigma1_before", float("nan")),
                r["sigma1_after"],
                r.get("ratio_sigma1", float("nan")),
                r.get("sigma_k1_before", float("nan")),
                r["sigma_k1_after"],
            )
            for r in result.spectra
        ],
    )
    if result.perplexity:
        p = result.perplexity
        print(
            f"perplexity (probe text): original {fmt(p['original'])}, defended {fmt(p['defended'])}"
        )
    if result.generations:
        g = result.generations
        same = "identical" if g["original"] == g["defended"] else "DIFFERENT"
        print(f"greedy after {g['prompt']!r}: {same}\n  original: {g['original']!r}")
        if g["original"] != g["defended"]:
            print(f"  defended: {g['defended']!r}")
    print(
        f"params {result.params_original:,} → {result.params_defended:,} "
        f"(+{result.overhead:.1%}); dtype {result.dtype}"
    )
    verdict = "PASS" if result.passed else "FAIL"
    print(
        f"{verdict}: max |Δ| {result.max_abs_diff:.3g}, max relative {result.max_rel_diff:.3g} "
        f"(tolerance {result.tolerance:.3g}), relative Frobenius {result.rel_fro_diff:.3g}"
    )
    return 0 if result.passed else 1
