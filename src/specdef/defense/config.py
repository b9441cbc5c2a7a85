"""What SpecDef defends and how: :class:`SpecDefConfig`, validated once in ``__post_init__``
(α, top-k, targets, method, tolerance) so every defend path — in memory, native, streaming — reads
the same checked values.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from specdef.defense import guard
from specdef.errors import SpecdefError, did_you_mean
from specdef.linalg import spectral


@dataclass(frozen=True)
class SpecDefConfig:
    """What to defend and how.

    alpha: factor (> 1) applied to the top-k singular values of each selected weight.
    top_k: number of singular values inflated per layer (1 ≤ top_k ≤ min(m, n) of every layer).
    targets: layer selection (names/suffixes, regex, ``"all-linear"``, ``"preset:NAME"``); see
        :mod:`specdef.defense.targets`.
    exclude: layers removed from the selection (names/suffixes tuple, or a regex string).
    method: ``"exact"`` (full SVD) or ``"randomized"`` (range finder, O(m·n·k)); both keep C·W̃ = W.
    seed: seeds the randomized sketch and the ``n_random`` draw.
    tolerance: precision-guard bound; None = :data:`DEFAULT_TOLERANCE` for the layer's dtype.
    force: defend even above the tolerance (recorded in the report).
    n_random: defend only this many of the matched layers, drawn with ``seed``.
    """

    alpha: float
    top_k: int
    targets: str | tuple[str, ...] = "all-linear"
    exclude: str | tuple[str, ...] = ()
    method: str = "exact"
    seed: int = 0
    tolerance: float | None = None
    force: bool = False
    n_random: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise SpecdefError(f"alpha must be a number > 1, found {self.alpha!r}.")
        if not math.isfinite(self.alpha) or self.alpha <= 1:
            raise SpecdefError(
                f"alpha must be a finite number > 1 (the inflation factor), found {self.alpha}; "
                "e.g. --alpha 1e4."
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise SpecdefError(
                f"top_k must be an integer ≥ 1, found {self.top_k!r}; e.g. --top-k 25."
            )
        if self.method not in spectral.METHODS:
            raise SpecdefError(
                f"method must be one of {', '.join(spectral.METHODS)}, found {self.method!r}."
            )
        guard.check_tolerance(self.tolerance)
        for fname in ("seed", "n_random"):
            value = getattr(self, fname)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SpecdefError(f"{fname} must be an integer, found {value!r}.")
        if self.n_random is not None and self.n_random < 1:
            raise SpecdefError(f"n_random must be ≥ 1, found {self.n_random}.")
        for fname in ("targets", "exclude"):
            value = getattr(self, fname)
            if isinstance(value, str):
                _check_regex(fname, value)
            elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                object.__setattr__(self, fname, tuple(value))
            else:
                raise SpecdefError(
                    f"{fname} must be a layer name, a list of names or a regex, found {value!r}."
                )

    def tolerance_for(self, dtype: torch.dtype) -> float:
        if self.tolerance is not None:
            return self.tolerance
        return guard.default_tolerance(dtype)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for fname in ("targets", "exclude"):
            if isinstance(out[fname], tuple):
                out[fname] = list(out[fname])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, also: Collection[str] = ()) -> SpecDefConfig:
        """The config ``data`` describes; a key that is neither a field nor in ``also`` (keys the
        caller reads itself, such as an experiment's ``mode``) is an error with "did you mean"."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known and key not in also:
                raise SpecdefError(did_you_mean(str(key), [*known, *also], what="defense key"))
        kwargs = {k: v for k, v in data.items() if k in known}
        for fname in ("targets", "exclude"):
            if isinstance(kwargs.get(fname), list):
                kwargs[fname] = tuple(kwargs[fname])
        return cls(**kwargs)


def _check_regex(fname: str, value: str) -> None:
    """A regex selection must compile before anything is read or written ("all-linear" and
    "preset:NAME" are names, not regexes)."""
    if value.lower() == "all-linear" or value.startswith("preset:"):
        return
    try:
        re.compile(value)
    except re.error as err:
        raise SpecdefError(f"Invalid {fname} regex {value!r}: {err}.") from None
