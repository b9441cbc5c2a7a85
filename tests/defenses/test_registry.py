"""The plug-in point: the registry's names, flags and did-you-mean errors, configs from plain data,
and a third-party defense registered and applied through the same protocol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from specdef.defense.config import SpecDefConfig
from specdef.defenses.catalog import defense_names, get_defense_entry, make_defense
from specdef.defenses.registry import (
    Defended,
    Defense,
    DefenseEntry,
    config_dict,
    make_config,
    parse_assignments,
    register_defense,
)
from specdef.errors import SpecdefError

BASELINES = ("gradient-ascent", "npo", "rmu", "repnoise", "tar", "condition-number")


def test_the_registry_holds_specdef_native_and_the_baselines() -> None:
    names = set(defense_names())
    assert {"specdef", "native", "unlearned-specdef", *BASELINES} <= names
    assert get_defense_entry("specdef").changes_architecture
    assert get_defense_entry("specdef").training_free
    assert not get_defense_entry("native").changes_architecture
    for name in BASELINES:
        entry = get_defense_entry(name)
        assert entry.needs_data and not entry.training_free and not entry.changes_architecture
        assert entry.cites and entry.deviations


def test_unknown_names_and_keys_say_did_you_mean() -> None:
    with pytest.raises(SpecdefError, match="Did you mean: repnoise"):
        get_defense_entry("repnoize")
    with pytest.raises(SpecdefError, match="Did you mean: steps"):
        make_config("npo", {"step": 3})


def test_configs_from_strings_are_typed_and_validated() -> None:
    config = make_config("tar", parse_assignments(["lr=1e-3", "steps=7", "inner_lrs=[0.1, 0.2]"]))
    assert (config.lr, config.steps, config.inner_lrs) == (1e-3, 7, (0.1, 0.2))
    assert make_config("rmu", {"layer": "layers.3"}).layer == "layers.3"
    assert isinstance(make_config("npo", {"beta": "1"}).beta, float)
    spec = make_config("specdef", {"alpha": "1e4", "top_k": "8"})
    assert spec == SpecDefConfig(alpha=1e4, top_k=8)
    with pytest.raises(SpecdefError, match="expected"):
        make_config("npo", {"steps": "many"})
    with pytest.raises(SpecdefError, match="lr > 0"):
        make_config("npo", {"lr": -1})
    with pytest.raises(SpecdefError, match="KEY=VALUE"):
        parse_assignments(["steps"])


def test_a_training_defense_refuses_to_run_without_data() -> None:
    with pytest.raises(SpecdefError, match="DefenseData"):
        make_defense("npo").apply(nn.Linear(2, 2))


@dataclass(frozen=True)
class _ScaleConfig:
    factor: float = 2.0


def _scale(model: nn.Module, config: Any, data: Any) -> Defended:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(config.factor)
    return Defended(model, {"scaled_by": config.factor})


def test_a_third_party_defense_plugs_in_through_the_same_protocol() -> None:
    register_defense(
        DefenseEntry(
            name="test-scale", config=_ScaleConfig, apply=_scale, summary="scale weights",
            cites="none", deviations="none", training_free=True,
        ),
        replace=True,
    )  # fmt: skip
    defense = make_defense("test-scale", {"factor": "3"})
    assert isinstance(defense, Defense)
    layer = nn.Linear(2, 2)
    before = layer.weight.detach().clone()
    defended = defense.apply(layer)
    assert torch.equal(defended.model.weight, 3 * before)
    assert defended.record["name"] == "test-scale"
    assert defended.record["config"] == {"factor": 3.0}
    assert defended.record["flags"]["training_free"]
    with pytest.raises(SpecdefError, match="already registered"):
        register_defense(get_defense_entry("test-scale"))


def test_a_yaml_file_is_a_config(tmp_path: Path) -> None:
    path = tmp_path / "npo.yaml"
    path.write_text("steps: 12\nlr: 3.0e-4\nbeta: 0.2\n")
    config = make_config("npo", parse_assignments([str(path)]))
    assert (config.steps, config.lr, config.beta) == (12, 3e-4, 0.2)
    path.write_text("[1, 2]\n")
    with pytest.raises(SpecdefError, match="mapping"):
        parse_assignments([str(path)])


@pytest.mark.parametrize("name", [*BASELINES, "unlearned-specdef"])
def test_every_builtin_config_builds_from_its_defaults_and_round_trips(name: str) -> None:
    config = make_config(name)
    assert make_config(name, config_dict(config)) == config  # the record's config rebuilds it
