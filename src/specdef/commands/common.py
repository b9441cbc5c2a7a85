"""Small helpers shared by sub-commands: the ``--threads`` and ``--device`` options, JSON output and
rich tables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from specdef.utils.devices import DEVICE_CHOICES, resolve_device

log = logging.getLogger(__name__)

THREADS_HELP = (
    "torch CPU threads (default: auto — the cores the 1-minute load average leaves free, at "
    "least 1, at most torch's default; on a busy machine two threads ran ≈6× slower than one, "
    "docs/benchmarks.md)"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, found {text!r}")
    return value


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` on a compute command; :func:`use_threads` applies it before the command runs."""
    parser.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N", help=THREADS_HELP
    )


def auto_threads(
    *, cpus: int | None = None, load: float | None = None, ceiling: int | None = None
) -> int:
    """The ``--threads`` default: ``cpus − ⌊load⌋`` (the cores the 1-minute load average leaves
    free), clipped to ``[1, ceiling]`` (``ceiling``: torch's default thread count). OpenMP threads
    that share a core with other busy processes spin and wait for each other, so oversubscribing
    costs far more than it gains."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform: assume idle
            load = 0.0
    ceiling = ceiling if ceiling is not None else torch.get_num_threads()
    return max(1, min(ceiling, cpus - int(load)))


def use_threads(args: argparse.Namespace) -> int | None:
    """Set torch's intra-op thread count from ``args.threads`` (or :func:`auto_threads` when the
    command has the option and it was not given); returns the count set, ``None`` for commands
    without the option."""
    if not hasattr(args, "threads"):
        return None
    threads = args.threads if args.threads is not None else auto_threads()
    torch.set_num_threads(threads)
    log.info("torch threads: %d", threads)
    return threads


DEVICE_HELP = (
    f"where the model runs: {DEVICE_CHOICES} (default: auto — CUDA device 0 when CUDA is "
    "available, else the CPU; probe and training batches follow the model)"
)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device`` on every command that runs a model; :func:`use_device` resolves it (one-line
    error, exit 2, for a device this machine lacks) before the command runs."""
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)


def use_device(args: argparse.Namespace) -> torch.device | None:
    """Replace ``args.device`` (text) by the :class:`torch.device` it names; ``None`` for commands
    without the option."""
    if not hasattr(args, "device"):
        return None
    args.device = resolve_device(args.device)
    log.info("device: %s", args.device)
    return args.device


def print_json(obj: Any) -> None:
    """Write ``obj`` to stdout as JSON (the ``--json`` output of every command)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table to stdout with rich (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(str(col))
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    Console(width=200).print(table)


def fmt(value: Any) -> str:
    """Format numbers compactly for tables."""
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)
