"""``specdef defend SRC -o OUT``: apply SpecDef (or, with ``--defense NAME``, any registered defense)
to a model and save the defended checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from specdef.commands.common import add_device_option, add_threads_option, print_json, print_table
from specdef.defense.apply import DefenseReport
from specdef.defense.config import SpecDefConfig
from specdef.defenses.catalog import defense_names, get_defense_entry
from specdef.defenses.registry import parse_assignments
from specdef.defenses.run import SPECDEF_MODES, DefenseRequest, defend_with
from specdef.errors import SpecdefError
from specdef.release.defend import DefendRequest, defend


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "defend",
        help="apply SpecDef to a model and save the defended checkpoint",
        description="Inflate the top-k singular values of the selected layers by ALPHA, insert the "
        "exact compensation layers, check the function is preserved in the model's dtype (the "
        "precision guard) and save OUT atomically (safetensors + config.json + manifest).",
    )
    parser.add_argument(
        "src",
        metavar="SRC",
        nargs="?",
        help="Hugging Face model directory, specdef checkpoint or zoo name",
    )
    parser.add_argument("-o", "--out", metavar="OUT", help="output directory (required)")
    parser.add_argument(
        "--defense",
        metavar="NAME",
        help="a registered defense (specdef defend --list-defenses): specdef, native, npo, rmu, "
        "repnoise, tar, … (default: SpecDef with the options below)",
    )
    parser.add_argument(
        "--defense-config",
        nargs="+",
        default=[],
        metavar="K=V",
        help="the defense's config: KEY=VALUE pairs (e.g. steps=40 lr=1e-3) or a YAML file",
    )
    parser.add_argument(
        "--list-defenses", action="store_true", help="list the registered defenses and exit"
    )
    parser.add_argument("--alpha", type=float, help="inflation factor (> 1); SpecDef only")
    parser.add_argument(
        "--top-k", type=int, help="singular values inflated per layer; SpecDef only"
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
        default="exact",
        help="top-k subspace: exact SVD or randomized range finder, O(m·n·k) (default: exact, in "
        "memory and with --streaming alike)",
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
        "(same tensors as in memory; keeps the source dtype; no probe-batch check, the model is "
        "never built); a killed run resumes when rerun with the same options",
    )
    add_threads_option(parser)
    add_device_option(parser)
    parser.set_defaults(func=run)


def _selection(values: list[str]) -> str | tuple[str, ...]:
    if len(values) == 1 and (values[0].lower() == "all-linear" or values[0].startswith("preset:")):
        return values[0]
    if len(values) == 1 and values[0].startswith("re:"):
        return values[0][3:]
    return tuple(values)


def run(args: argparse.Namespace) -> int:
    if args.list_defenses:
        return _list_defenses()
    if not args.src or not args.out:
        raise SpecdefError(
            "specdef defend needs SRC and -o OUT; e.g. specdef defend mlp-digits -o out/ …"
        )
    if args.defense is not None:
        return _run_registered(args)
    if args.defense_config:
        raise SpecdefError(
            "--defense-config needs --defense NAME; e.g. --defense npo --defense-config steps=40."
        )
    if args.alpha is None or args.top_k is None:
        raise SpecdefError(
            "SpecDef needs --alpha and --top-k (e.g. --alpha 1e4 --top-k 8), or pick another "
            "defense with --defense NAME."
        )
    config = SpecDefConfig(
        alpha=args.alpha,
        top_k=args.top_k,
        targets=_selection(args.targets),
        exclude=_selection(args.exclude) if args.exclude else (),
        method=args.method,
        seed=args.seed,
        tolerance=args.tolerance,
        force=args.force,
        n_random=args.n_random,
    )
    request = DefendRequest(
        source=args.src,
        output=args.out,
        config=config,
        mode=args.mode,
        streaming=args.streaming,
        dtype=args.dtype,
        overwrite=args.overwrite,
        probe=not args.streaming,  # streaming never builds the model to run a probe batch
        device=None if args.streaming else str(args.device),
    )
    result = defend(request)
    if args.json:
        print_json(result.to_dict())
        return 0
    where = " (streaming)" if args.streaming else ""
    if result.report is not None:
        _print_algorithm1(result.report, config, where)
    else:
        print_table(
            f"SpecDef native{where} alpha={config.alpha:g} top_k={config.top_k} "
            f"({len(result.pairs)} pairs)",
            ["pair", "kind", "σmax before", "σmax after", "product error in dtype", "tolerance"],
            [
                (p.pair, p.kind, p.sigma_max_before, p.sigma_max_after, p.product_error,
                 p.tolerance)
                for p in result.pairs
            ],
        )  # fmt: skip
        if result.model_output_gap is not None:
            print(f"model output gap {result.model_output_gap:.3g}")
    if result.resumed_shards:
        print(
            f"resumed: {len(result.resumed_shards)} shard(s) finished by an earlier run, verified, "
            "kept"
        )
    for skipped in result.not_copied:
        print(f"not copied: {skipped}")
    print(f"saved: {args.out} (model card: {args.out}/README.md)")
    return 0


def _print_algorithm1(report: DefenseReport, config: SpecDefConfig, where: str) -> None:
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
        f"SpecDef{where} alpha={config.alpha:g} top_k={config.top_k} ({len(rows)} layers)",
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


def _list_defenses() -> int:
    rows = []
    for name in defense_names():
        entry = get_defense_entry(name)
        flags = [
            f for f in ("needs_data", "training_free", "changes_architecture") if getattr(entry, f)
        ]
        rows.append((name, ", ".join(flags) or "—", ", ".join(entry.kinds), entry.summary))
    print_table("registered defenses", ["name", "flags", "kinds", "what it changes"], rows)
    return 0


_SPECDEF_FLAGS = ("alpha", "top_k", "method", "seed", "tolerance", "n_random")


def _run_registered(args: argparse.Namespace) -> int:
    if args.streaming or args.mode != "algorithm1":
        raise SpecdefError(
            "--streaming and --mode belong to SpecDef without --defense; use --defense native for "
            "the native deformation, or drop --defense to stream."
        )
    values = parse_assignments(args.defense_config)
    if args.defense in SPECDEF_MODES:  # the SpecDef flags still apply
        for name in _SPECDEF_FLAGS:
            if getattr(args, name, None) is not None and name not in values:
                values[name] = getattr(args, name)
        if args.force:
            values.setdefault("force", True)
        if args.targets != ["all-linear"]:
            values.setdefault("targets", _selection(args.targets))
    elif args.alpha is not None or args.top_k is not None:
        raise SpecdefError(
            f"--alpha/--top-k set SpecDef; for {args.defense!r} pass --defense-config KEY=VALUE "
            "(unlearned-specdef takes alpha=… top_k=…)."
        )
    outcome = defend_with(
        DefenseRequest(
            source=args.src, output=args.out, defense=args.defense, values=values,
            overwrite=args.overwrite, dtype=args.dtype, device=str(args.device),
        )
    )  # fmt: skip
    if args.json:
        print_json(outcome.record)
        return 0
    record = outcome.record
    measured = record.get("unlearning") or record
    before, after = measured.get("before") or {}, measured.get("after") or {}
    if before:
        print_table(
            f"{args.defense} on {args.src} ({outcome.seconds:.1f} s)",
            ["held-out metric", "before", "after"],
            [(key, before[key], after.get(key, float("nan"))) for key in before],
        )
    print(f"saved: {args.out} (model card: {args.out}/README.md)")
    return 0
