"""``specdef report RUN_DIR``: results.jsonl → report.md + PNG plots (no training code)."""

from __future__ import annotations

import argparse
from typing import Any

from specdef.errors import SpecdefError
from specdef.report.blocks import update_page
from specdef.report.page import write_report


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "report",
        help="turn a run directory's results.jsonl into report.md with tables and plots",
        description="Read RUN_DIR/results.jsonl (or a results.jsonl path) and write report.md and "
        "PNG figures. The report is a pure function of the rows: rerun it any time.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="run directory or results.jsonl file"
    )
    parser.add_argument(
        "--page",
        metavar="PAGE.md",
        help="instead: re-render the '<!-- specdef report: SECTION RUN_DIR… -->' blocks of a "
        "results page from the rows of the run directories they name (blocks whose run "
        "directories hold no rows are kept as they are)",
    )
    parser.add_argument("--out", help="folder for report.md and figures (default: RUN_DIR)")
    parser.add_argument("--title", help="report title (default: the experiment names)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.page:
        if args.run_dir:
            raise SpecdefError("Give RUN_DIR or --page PAGE.md, not both; a page names its runs.")
        update = update_page(args.page)
        for section in update.rendered:
            print(f"rendered: {section}")
        for section, why in update.kept:
            print(f"kept as published: {section} ({why})")
        print(f"page: {update.path}")
        return 0
    if not args.run_dir:
        raise SpecdefError("Expected RUN_DIR (a run directory) or --page PAGE.md.")
    path = write_report(args.run_dir, out=args.out, title=args.title)
    print(f"report: {path}")
    return 0
