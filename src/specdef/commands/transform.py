"""``specdef transform MODEL --adaptive fuse|inject|factor:J|untouched|rebalance``: an informed
attacker's function-preserving transform, with its parameter bill and the function gap on a probe
batch."""

from __future__ import annotations

import argparse
from typing import Any

from specdef.commands.common import add_device_option, add_threads_option, print_json, print_table
from specdef.defense import probe as probing
from specdef.errors import SpecdefError
from specdef.informed.transforms import apply_adaptive, parse_adaptive
from specdef.io import card
from specdef.io.checkpoint import save_defended
from specdef.release.sources import load_source, probe_batch
from specdef.utils.files import preflight_output


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "transform",
        help="apply an informed attacker's transform (fuse, inject, factor:J, untouched, rebalance)",
        description="Apply a function-preserving transform to a defended model and report what it "
        "did: the layers it acted on, the parameter count before/after and the output gap on a "
        "probe batch. Pairs come from the defended structure, or from detection on the weights "
        "when there is none. 'rebalance' undoes native deformation (specdef defend --mode native) "
        "by balancing every symmetric pair. Only 'fuse' and 'rebalance' yield a standard "
        "architecture, so only they can be saved with -o; the others are applied at attack time "
        "(specdef attack --adaptive).",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="specdef checkpoint, Hugging Face directory or zoo name"
    )
    parser.add_argument(
        "--adaptive",
        required=True,
        metavar="T",
        help="fuse | inject | inject:all-linear | factor:J | untouched | rebalance",
    )
    parser.add_argument(
        "-o", "--out", metavar="OUT", help="save the result here (fuse and rebalance only)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    add_threads_option(parser)
    add_device_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    name, _ = parse_adaptive(args.adaptive)
    if args.out and name not in ("fuse", "rebalance"):
        raise SpecdefError(
            "-o saves only 'fuse' and 'rebalance' (a standard architecture); found --adaptive "
            f"{args.adaptive}. "
            "Apply it at attack time instead: specdef attack MODEL --adaptive " + args.adaptive
        )
    if args.out:
        preflight_output(args.out, overwrite=args.overwrite)
    source = load_source(
        args.model, device=args.device
    )  # rebuilds a defended directory whose manifest is gone
    model = source.model
    probe = probe_batch(model, source.tokenizer)
    with torch.no_grad():
        before = probing.model_output(model, probe)
        model, record = apply_adaptive(model, args.adaptive)
        gap = probing.relative_gap(probing.model_output(model, probe), before)
    if args.out:
        save_defended(
            model,
            args.out,
            tokenizer=source.tokenizer,
            overwrite=args.overwrite,
            extra={"source": args.model, "transform": record.to_dict(), "probe_gap": gap},
            texts={
                card.CARD: card.transform_card(
                    source=args.model,
                    transform=args.adaptive,
                    params_before=record.params_before,
                    params_after=record.params_after,
                    probe_gap=gap,
                )
            },
        )
    out = {**record.to_dict(), "probe_gap": gap, "saved": args.out}
    if args.json:
        print_json(out)
        return 0
    print_table(
        f"{record.transform} on {args.model} (pairs from the {record.source})",
        ["layers", "params before", "params after", "added", "added %", "probe gap"],
        [(len(record.layers), record.params_before, record.params_after, record.params_added,
          record.params_added_pct, gap)],
    )  # fmt: skip
    if record.frozen:
        print(f"frozen for the attack: {len(record.frozen)} modules (train mode {record.train})")
    if args.out:
        print(f"saved: {args.out}")
    return 0
