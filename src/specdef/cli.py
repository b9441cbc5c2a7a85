"""The ``specdef`` command line: a thin shell that parses arguments and calls library functions.

Each sub-command lives in ``specdef.commands.<name>`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func=run``; ``run(args) -> int`` returns the exit code. User errors
(:class:`~specdef.errors.SpecdefError`) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from specdef import __version__
from specdef.commands.common import use_device, use_threads
from specdef.errors import SpecdefError
from specdef.utils import progress

COMMANDS = (
    "demo",
    "defend",
    "verify",
    "inspect",
    "zoo",
    "curvature",
    "attack",
    "detect",
    "transform",
    "run",
    "report",
)


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    """The ``specdef`` parser, built once per process (≈20 ms: in-process callers such as the
    fuzz test call :func:`main` thousands of times; parsing never mutates it)."""
    parser = argparse.ArgumentParser(
        prog="specdef",
        description="SpecDef: defend a model by spectral reparameterization, attack it, measure "
        "its curvature, and reproduce the paper's claims.",
    )
    parser.add_argument("--version", action="version", version=f"specdef {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"specdef.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"specdef.commands.{name}":
                continue  # command not built in this version
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    use_threads(args)
    try:
        with progress.enabled(
            (not getattr(args, "json", False) and sys.stderr.isatty())
            or bool(os.environ.get("SPECDEF_PROGRESS"))
        ):
            use_device(args)
            return int(args.func(args) or 0)
    except SpecdefError as err:
        print(f"specdef: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specdef: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
