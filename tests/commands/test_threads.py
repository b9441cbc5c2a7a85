"""``--threads N`` on every compute command: one shared option, applied before the command runs."""

from __future__ import annotations

import argparse

import pytest
import torch

from specdef import cli
from specdef.commands.common import auto_threads, use_threads

COMPUTE = ("defend", "verify", "attack", "curvature", "detect", "transform", "run")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_compute_command_has_the_option() -> None:
    subs = _subparsers(cli.build_parser())
    for name in COMPUTE:
        options = {s for a in subs[name]._actions for s in a.option_strings}
        assert "--threads" in options, name


def test_auto_threads_leaves_busy_cores_alone() -> None:
    assert auto_threads(cpus=2, load=0.3, ceiling=2) == 2
    assert auto_threads(cpus=2, load=1.0, ceiling=2) == 1
    assert auto_threads(cpus=2, load=6.5, ceiling=2) == 1  # never below one
    assert auto_threads(cpus=64, load=3.9, ceiling=32) == 32  # never above torch's default
    assert auto_threads(cpus=64, load=40.2, ceiling=64) == 24


def test_threads_are_set_and_bad_values_refused(capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    parser = cli.build_parser()
    try:
        args = parser.parse_args(["defend", "src", "-o", "out", "--alpha", "10", "--top-k", "2",
                                  "--threads", "1"])  # fmt: skip
        assert use_threads(args) == 1 and torch.get_num_threads() == 1
        args = parser.parse_args(["defend", "src", "-o", "out", "--alpha", "10", "--top-k", "2"])
        assert use_threads(args) == auto_threads()
        assert use_threads(parser.parse_args(["zoo", "list"])) is None  # no option, untouched
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["attack", "--threads", "0"])
    assert info.value.code == 2
    assert "expected a whole number ≥ 1, found '0'" in capsys.readouterr().err
