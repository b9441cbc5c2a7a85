"""What a defense costs at inference: the parameter ratio and the measured forward-latency ratio of
the defended model against the undefended one on the probe batch.

Algorithm 1 adds an m×m compensation per defended layer, so both ratios are above 1 by construction
(SmolLM2-135M, all linears: ≈2.3× the parameters); the native deformation keeps both at ≈1.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from specdef.defense import probe as probing
from specdef.defense.layer import count_parameters

REPEATS = 5


@dataclass(frozen=True)
class InferenceCost:
    """Parameters and median forward seconds on the probe batch, before and after defending."""

    params_before: int
    params_after: int
    latency_before_s: float  # median of ``repeats`` timed forwards after one warm-up
    latency_after_s: float
    repeats: int
    threads: int  # torch intra-op threads during the timing

    @property
    def parameter_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def latency_ratio(self) -> float:
        return self.latency_after_s / self.latency_before_s

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["parameter_ratio"] = self.parameter_ratio
        out["latency_ratio"] = self.latency_ratio
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceCost:
        """Back from :meth:`to_dict` (the ratios are recomputed, not read)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@torch.no_grad()
def forward_latency(model: nn.Module, probe: probing.Probe, *, repeats: int = REPEATS) -> float:
    """Median wall seconds of ``repeats`` forwards of ``model`` on ``probe`` (no grad, eval mode),
    after one untimed warm-up (first-call allocation and kernel selection)."""
    probing.model_output(model, probe)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        probing.model_output(model, probe)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference_cost(
    model: nn.Module,
    probe: probing.Probe,
    *,
    params_before: int,
    latency_before_s: float,
    repeats: int = REPEATS,
) -> InferenceCost:
    """The cost of the defended ``model`` against the undefended figures measured before it was
    defended in place (``count_parameters``: distinct parameters, a tied weight once;
    :func:`forward_latency` with the same ``repeats``).
    The latency ratio is a measurement: machine load can move it between the two timings."""
    return InferenceCost(
        params_before=params_before,
        params_after=count_parameters(model),
        latency_before_s=latency_before_s,
        latency_after_s=forward_latency(model, probe, repeats=repeats),
        repeats=repeats,
        threads=torch.get_num_threads(),
    )
