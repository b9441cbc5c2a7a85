"""``specdef run CONFIG [--set key=value …]``: run an experiment config, resumably."""

from __future__ import annotations

import argparse
from typing import Any

from specdef.commands.common import add_device_option, add_threads_option, print_json
from specdef.experiments.config import expand, load_config
from specdef.experiments.run import run_experiment, validate
from specdef.report.page import write_report


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "run",
        help="run an experiment config (YAML) into a run directory; rerunning resumes",
        description="Expand CONFIG's grid × seeds into runs and execute those not yet in "
        "RUN_DIR/results.jsonl. CONFIG is a YAML path or a shipped config's name (E1 … E7). "
        "The resolved config is written to RUN_DIR/config.yaml; then `specdef report RUN_DIR`.",
    )
    parser.add_argument(
        "config", metavar="CONFIG", help="YAML file, or a shipped name such as E1 or E2-vision"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value by dotted key (repeatable), e.g. --set attack.steps=5 "
        "--set grid.attack.lr=[1e-3] --set model=tiny-llama; a grid axis set this way is pinned",
    )
    parser.add_argument("--out", help="run directory (default: runs/<name>[-<overrides hash>])")
    parser.add_argument("--limit", type=int, help="execute at most this many runs now")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the expanded runs and exit without running"
    )
    parser.add_argument(
        "--report", action="store_true", help="write RUN_DIR/report.md when the runs finish"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_threads_option(parser)
    add_device_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        runs = expand(config)
        validate(runs)
        if args.json:
            print_json([{"run_id": r.run_id, **r.to_dict()} for r in runs])
        else:
            print(f"{config.name}: {len(runs)} runs ({config.kind})")
            for r in runs:
                print(f"  {r.run_id}  defense={r.defense}  attack={r.attack}  seed={r.seed}")
        return 0
    summary = run_experiment(
        config, run_dir=args.out, overrides=args.overrides, limit=args.limit, device=args.device
    )
    out: dict[str, Any] = {
        "experiment": config.name,
        "run_dir": str(summary.run_dir),
        "runs": summary.total,
        "resumed_skipped": summary.skipped,
        "ran": summary.ran,
        "seconds": round(summary.seconds, 1),
        "results": str(summary.results),
    }
    if summary.trials is not None:
        out["trials_run"] = summary.trials
    if args.report:
        out["report"] = str(write_report(summary.run_dir))
    if args.json:
        print_json(out)
    else:
        what = "" if summary.trials is None else f" ({summary.trials} trials)"
        print(
            f"{config.name}: ran {summary.ran}{what}, skipped {summary.skipped} finished, "
            f"{summary.total} in all, {summary.seconds:.1f} s → {summary.results}"
        )
        if "report" in out:
            print(f"report: {out['report']}")
    return 0
