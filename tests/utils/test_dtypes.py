"""Dtype names: one table for --dtype, experiment configs and manifests."""

from __future__ import annotations

import pytest
import torch

from specdef.errors import SpecdefError
from specdef.utils.dtypes import DTYPES, SHORT_NAMES, dtype_named, parse_dtype


def test_names_and_short_names_agree() -> None:
    assert parse_dtype(None) is None
    for name, dtype in DTYPES.items():
        assert dtype_named(name) is dtype and str(dtype) == f"torch.{name}"
    for short, name in SHORT_NAMES.items():
        assert dtype_named(short) is DTYPES[name]
    assert dtype_named("bf16") is torch.bfloat16


def test_unknown_name_suggests_the_close_one() -> None:
    with pytest.raises(SpecdefError, match=r"Unknown dtype 'flaot32'\. Did you mean: float32"):
        parse_dtype("flaot32")
