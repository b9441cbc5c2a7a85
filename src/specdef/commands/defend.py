"""``specdef defend SRC -o OUT``: apply SpecDef to a model and save the defended checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from specdef.commands._common import add_threads_option, print_json, print_table
from specdef.defense.config import SpecDefConfig
from specdef.errors import SpecdefError
from specdef.release.defend import defend_native_to, defend_to
from specdef.streaming.defend import defend_streaming


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "defend",
        help="apply SpecDef to a model and save the defended checkpoint",
        description="Inflate the top-k singular values of the selected layers by ALPHA, insert the "
        "exact compensation layers, check the function is preserved in the model's dtype (the "
        "precision guard) and save OUT atomically (safetensors + config.json + manifest).",
    )
    parser.add_argument(
        "src", metavar="SRC", help="Hugging Face model directory, specdef checkpoint or zoo name"
    )
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory")
    parser.add_argument("--alpha", type=float, required=True, help="inflation factor (> 1)")
    parser.add_argument(
        "--top-k", type=int, required=True, help="singular values inflated per layer"
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["all-linear"],
        metavar="T",
        help="layer names or dotted suffixes (e.g. gate_proj v_proj o_proj), 'all-linear', "
        "'preset:NAME' (llama, gpt2, bert, …) or 're:REGEX' (default: all-linear)",
    )
    parser.add_argument(
        "--exclude", nargs="+", default=[], metavar="E", help="names/suffixes, or 're:REGEX'"
    )
    parser.add_argument("--n-random", type=int, help="defend only N of the matched layers")
    parser.add_argument("--seed", type=int, default=0, help="seed (randomized method, --n-random)")
    parser.add_argument(
        "--method",
        choices=["exact", "randomized"],
        default=None,
        help="top-k subspace: exact SVD or randomized range finder (default: exact; randomized "
        "with --streaming)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float64", "float32", "bfloat16", "float16"],
        help="store and run the model in this dtype (default: the source's)",
    )
    parser.add_argument(
        "--tolerance", type=float, help="precision-guard bound (default: per dtype)"
    )
    parser.add_argument(
        "--force", action="store_true", help="save even above the tolerance (recorded)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT (with --streaming, also discard a killed run's partial "
        "output made with other options; with the same options it is resumed either way)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--mode",
        choices=["algorithm1", "native"],
        default="algorithm1",
        help="algorithm1: inflated + compensation layers (the paper); native: fold the "
        "compensation into existing symmetric layers (V/O, up/down, ReLU pairs) — same "
        "architecture and parameter count, loads with stock from_pretrained (default: algorithm1)",
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="defend a (sharded) safetensors directory tensor by tensor without loading the model "
        "(randomized top-k unless --method exact); a killed run resumes when rerun with the same "
        "options",
    )
    add_threads_option(parser)
    parser.set_defaults(func=run)


def _selection(values: list[str]) -> str | tuple[str, ...]:
    if len(values) == 1 and (values[0].lower() == "all-linear" or values[0].startswith("preset:")):
        return values[0]
    if len(values) == 1 and values[0].startswith("re:"):
        return values[0][3:]
    return tuple(values)


def _run_native_or_streaming(args: argparse.Namespace) -> int:
    """``--mode native`` and ``--streaming`` (issue 8): thin calls into specdef.native.apply / streaming."""
    targets = None if args.targets == ["all-linear"] else _selection(args.targets)
    exclude = _selection(args.exclude) if args.exclude else ()
    if args.streaming:
        if args.n_random is not None or args.dtype is not None:
            raise SpecdefError(
                "--streaming keeps the source dtype and defends every matched layer; drop "
                "--n-random / --dtype."
            )
        result = defend_streaming(
            args.src, args.out, mode=args.mode, alpha=args.alpha, top_k=args.top_k,
            targets=targets, exclude=exclude,
            method=args.method or "randomized",
            seed=args.seed, tolerance=args.tolerance, force=args.force, overwrite=args.overwrite,
        )  # fmt: skip
        rows = [
            (
                layer.get("name", layer.get("pair")),
                layer.get("reconstruction_error", layer.get("product_error")),
            )
            for layer in result.layers
        ]
        summary = {"out": args.out, "mode": args.mode, "seconds": result.seconds,
                   "bytes_in": result.bytes_in, "bytes_out": result.bytes_out, "layers": list(result.layers),
                   "resumed_shards": list(result.resumed_shards)}  # fmt: skip
    else:
        records = defend_native_to(
            args.src, args.out, alpha=args.alpha, top_k=args.top_k, targets=targets,
            exclude=exclude, method=args.method or "exact", seed=args.seed, tolerance=args.tolerance,
            force=args.force, dtype=args.dtype, overwrite=args.overwrite,
        )  # fmt: skip
        rows = [(r.pair, r.product_error) for r in records]
        summary = {"out": args.out, "mode": "native", "pairs": [r.as_dict() for r in records]}
    if args.json:
        print_json(summary)
        return 0
    print_table(
        f"SpecDef {args.mode}{' (streaming)' if args.streaming else ''} alpha={args.alpha:g} "
        f"top_k={args.top_k} ({len(rows)} {'pairs' if args.mode == 'native' else 'layers'})",
        ["layer / pair", "relative error in dtype"],
        rows,
    )
    if args.streaming and result.resumed_shards:
        print(
            f"resumed: {len(result.resumed_shards)} shard(s) finished by an earlier run, verified, kept"
        )
    print(f"saved: {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "mode", "algorithm1") != "algorithm1" or getattr(args, "streaming", False):
        return _run_native_or_streaming(args)

    config = SpecDefConfig(
        alpha=args.alpha,
        top_k=args.top_k,
        targets=_selection(args.targets),
        exclude=_selection(args.exclude) if args.exclude else (),
        method=args.method or "exact",
        seed=args.seed,
        tolerance=args.tolerance,
        force=args.force,
        n_random=args.n_random,
    )
    report = defend_to(args.src, args.out, config, dtype=args.dtype, overwrite=args.overwrite)
    if args.json:
        print_json({"out": args.out, **report.to_dict()})
        return 0
    rows = [
        (
            layer.name,
            f"{layer.shape[0]}×{layer.shape[1]}",
            layer.sigma_before[0],
            layer.sigma_after[0],
            layer.sigma_before[min(config.top_k, len(layer.sigma_before) - 1)],
            layer.sigma_after[min(config.top_k, len(layer.sigma_after) - 1)],
            layer.reconstruction_error,
            layer.output_gap if layer.output_gap is not None else float("nan"),
        )
        for layer in report.layers
    ]
    print_table(
        f"SpecDef alpha={config.alpha:g} top_k={config.top_k} ({len(rows)} layers)",
        ["layer", "m×n", "σ1 before", "σ1 after", "σk+1 before", "σk+1 after", "recon err", "gap"],
        rows,
    )
    overhead = report.params_after / report.params_before - 1
    gap = report.model_output_gap
    print(
        f"params {report.params_before:,} → {report.params_after:,} (+{overhead:.1%}); "
        f"max reconstruction error {report.max_reconstruction_error:.3g}; "
        f"model output gap {gap if gap is not None else float('nan'):.3g}"
        + (" [FORCED past the precision guard]" if report.forced else "")
    )
    cost = report.inference_cost
    if cost is not None:
        print(
            f"inference cost: ×{cost.parameter_ratio:.2f} parameters, ×{cost.latency_ratio:.2f} "
            f"forward latency on the probe batch (median of {cost.repeats}, {cost.threads} thread(s))"
        )
    print(f"saved: {args.out}")
    return 0
