"""``specdef report RUN_DIR``: results.jsonl → report.md + PNG plots (no training code)."""

from __future__ import annotations

import argparse
from typing import Any

from specdef.report.page import write_report


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "report",
        help="turn a run directory's results.jsonl into report.md with tables and plots",
        description="Read RUN_DIR/results.jsonl (or a results.jsonl path) and write report.md and "
        "PNG figures. The report is a pure function of the rows: rerun it any time.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory or results.jsonl file")
    parser.add_argument("--out", help="folder for report.md and figures (default: RUN_DIR)")
    parser.add_argument("--title", help="report title (default: the experiment names)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    path = write_report(args.run_dir, out=args.out, title=args.title)
    print(f"report: {path}")
    return 0
