"""Inference cost of a defense: the parameter ratio (exact, against a count from the layer shapes)
and the measured forward-latency ratio on the probe batch, in the library and in `defend --json`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from _tiny import tiny_llama, token_batch
from specdef.cli import main
from specdef.defense.apply import DefenseReport, apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.cost import forward_latency, inference_cost
from specdef.defense.layer import count_parameters, defended_layers


def _shape_count(model: object) -> int:
    """Every distinct parameter tensor's size, summed by hand from the modules' shapes."""
    seen: dict[int, int] = {}
    for module in model.modules():  # type: ignore[attr-defined]
        for param in module.parameters(recurse=False):
            seen[id(param)] = math.prod(param.shape)
    return sum(seen.values())


def test_parameter_ratio_is_exact_and_latencies_are_measured() -> None:
    model, batch = tiny_llama(), token_batch()
    params_before = _shape_count(model)
    counted, latency_before = count_parameters(model), forward_latency(model, batch, repeats=3)
    report = apply_specdef_(model, SpecDefConfig(alpha=1e4, top_k=4, targets="preset:llama"),
                            probe=batch)  # fmt: skip
    cost = inference_cost(
        model, batch, params_before=counted, latency_before_s=latency_before, repeats=3
    )
    # one m×m compensation per defended layer, the bias moved, not duplicated
    added = sum(layer.out_features**2 for layer in defended_layers(model).values())
    assert cost.params_before == params_before == report.params_before
    assert cost.params_after == _shape_count(model) == params_before + added
    assert cost.parameter_ratio == (params_before + added) / params_before
    assert 0 < cost.latency_before_s < 10 and 0 < cost.latency_after_s < 10
    assert cost.latency_ratio == cost.latency_after_s / cost.latency_before_s > 0
    assert cost.repeats == 3 and cost.threads >= 1
    row = cost.to_dict()
    assert row["parameter_ratio"] == cost.parameter_ratio and row["latency_ratio"] > 0
    # the manifest's copy reads back (the ratios recomputed from the four measurements)
    with_cost = dataclasses.replace(report, inference_cost=cost)
    assert DefenseReport.from_dict(json.loads(json.dumps(with_cost.to_dict()))) == with_cost


def test_defend_json_carries_the_inference_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "tiny-llama"
    model = tiny_llama()
    model.save_pretrained(src)
    params = _shape_count(model)
    argv = [*f"defend {src} -o {tmp_path / 'out'} --alpha 1e4 --top-k 4 --json --threads 1".split(),
            "--targets", "preset:llama"]  # fmt: skip
    assert main(argv) == 0
    cost = json.loads(capsys.readouterr().out)["inference_cost"]
    added = 2 * (24**2 + 48**2 + 80**2)  # v, o, gate of 2 layers: m² each
    assert cost["params_before"] == params and cost["params_after"] == params + added
    assert cost["parameter_ratio"] == pytest.approx((params + added) / params, rel=1e-15)
    for key in ("latency_before_s", "latency_after_s", "latency_ratio"):
        assert math.isfinite(cost[key]) and cost[key] > 0
    assert cost["threads"] == 1
