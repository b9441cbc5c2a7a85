"""``specdef inspect OUT``: a defended checkpoint's manifest as a table."""

from __future__ import annotations

import argparse
from typing import Any

from specdef.commands.common import print_json, print_table
from specdef.errors import SpecdefError
from specdef.io.checkpoint import read_manifest


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "inspect",
        help="show a defended checkpoint's manifest",
        description="Print the manifest of a checkpoint written by `specdef defend`: the config, "
        "each defended layer's spectra and reconstruction error, parameter counts and provenance.",
    )
    parser.add_argument("out", metavar="OUT", help="checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print the raw manifest")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    manifest = read_manifest(args.out)  # schema and integrity checked
    if args.json:
        print_json(manifest)
        return 0
    try:
        _print(manifest, args.out)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise SpecdefError(
            f"The defense report in the manifest of {args.out!r} is malformed ({type(err).__name__}: "
            f"{err}); re-save the checkpoint with specdef."
        ) from None
    return 0


def _print(manifest: dict[str, Any], out: str) -> None:
    defense = manifest.get("defense") or {}
    config = defense.get("config", {})
    k = int(config.get("top_k", 0))
    rows = []
    for layer in defense.get("layers", []):
        before, after = layer["sigma_before"], layer["sigma_after"]
        gap = layer.get("output_gap")
        rows.append(
            (
                layer["name"],
                "×".join(str(d) for d in layer["shape"]),
                layer["dtype"],
                before[0],
                after[0],
                before[k] if k < len(before) else float("nan"),
                after[k] if k < len(after) else float("nan"),
                layer["reconstruction_error"],
                gap if gap is not None else float("nan"),
                f"{layer['params_before']:,} → {layer['params_after']:,}",
            )
        )
    if not rows:  # saved without a report: the structure is all there is
        rows = [
            (s["name"], "×".join(map(str, s["shape"])), manifest.get("dtype"), *["—"] * 7)
            for s in manifest.get("structure", [])
        ]
    model = manifest.get("model", {})
    print_table(
        f"{model.get('class') or model.get('architecture', {}).get('name')} — {out}",
        ["layer", "m×n", "dtype", "σ1 before", "σ1 after", "σk+1 before", "σk+1 after",
         "recon err", "gap", "params"],
        rows,
    )  # fmt: skip
    prov = manifest.get("provenance", {})
    if config:
        print(
            f"alpha={config.get('alpha')} top_k={k} targets={config.get('targets')} "
            f"exclude={config.get('exclude')} method={config.get('method')} seed={config.get('seed')}"
        )
        print(
            f"params {defense.get('params_before'):,} → {defense.get('params_after'):,}; "
            f"model output gap {defense.get('model_output_gap')}; forced={defense.get('forced')}"
        )
    print(f"dtype {manifest.get('dtype')}; git {prov.get('git')}; saved {prov.get('time_utc')}")
