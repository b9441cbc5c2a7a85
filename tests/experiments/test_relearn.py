"""The ``relearn`` kind (Table 1 per registry defense) on the zoo's mlp-digits, tiny budgets: the
utility it records against a direct evaluation, SpecDef's function preservation and curvature
against the undefended model's, the search it ran, and the report sections over its rows."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

from specdef import zoo
from specdef.errors import SpecdefError
from specdef.experiments import search as searched
from specdef.experiments.config import expand, load_config
from specdef.experiments.relearn import search_config
from specdef.experiments.run import run_experiment
from specdef.report.table1 import curvature_section, table1_section

VARIANTS = (
    "[{defense.name: null}, {defense.name: specdef, defense.alpha: 1.0e+4, defense.top_k: 8}]"
)
SET = [f"grid.variants={VARIANTS}", "attack.steps=20", "measure.search.trials=2", "seeds=[0]"]
SET += ["measure.lrs=[1.0e-3]", "measure.curvature.max_hvps=12"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("relearn") / "run"
    summary = run_experiment(load_config("table1", SET), run_dir=out)
    assert summary.ran == 2
    lines = (out / "results.jsonl").read_text().splitlines()
    return {r["defense_name"]: r for r in map(json.loads, lines)}


def test_utility_matches_a_direct_evaluation(rows: dict[str, dict[str, Any]]) -> None:
    model = zoo.load_model("mlp-digits").eval()
    x, y = zoo.load_task("digits-harmful").heldout["benign"]
    with torch.no_grad():
        accuracy = float((model(x).argmax(-1) == y).float().mean())
    none = rows["none"]["utility"]
    assert none["source"]["benign_accuracy"] == pytest.approx(accuracy)
    assert none["defended"] == none["source"]  # no defense: nothing changed
    spec = rows["specdef"]["utility"]
    assert spec["source"] == none["source"]
    # Algorithm 1 preserves the function: the benign accuracy moves by at most one example in 100
    assert abs(spec["defended"]["benign_accuracy"] - accuracy) <= 0.01


def test_curvature_and_search_are_recorded(rows: dict[str, dict[str, Any]]) -> None:
    for row in rows.values():
        curv = row["curvature"]
        assert curv["lr_ceiling"] == pytest.approx(2.0 / curv["eigenvalues"][0])
        assert len(curv["eigenvalues"]) == 3 and curv["hvps"] <= 12
        search = row["search"]
        assert search["trials"] == 2 and search["trained"] == 2 and len(search["trial_lrs"]) == 2
        assert search["rungs"][0]["threshold"] == "harmful_accuracy>=0.75"
        assert [g["lr"] for g in row["grid"]] == [1e-3]
    # α = 1e4 inflates the top of the spectrum by orders of magnitude (docs/theory.md)
    ratio = (
        rows["specdef"]["curvature"]["eigenvalues"][0] / rows["none"]["curvature"]["eigenvalues"][0]
    )
    assert ratio > 1e4


def test_report_sections_over_the_rows(rows: dict[str, dict[str, Any]]) -> None:
    table = table1_section(list(rows.values()))
    assert "| none |" in table and "| specdef |" in table and "lr 0.001: steps / best" in table
    curvature = curvature_section(list(rows.values()))
    ceiling = rows["specdef"]["curvature"]["lr_ceiling"]
    assert f"{ceiling:.2e}" in curvature


def test_measure_search_goes_through_the_search_blocks_validator() -> None:
    run = expand(load_config("table1", ["measure.search.storage=elsewhere.journal"]))[0]
    one = expand(load_config("table1", ["seeds=[2]"]))[0]
    config = search_config(one)
    # the same SearchConfig an attack experiment's search: block gives, seed stride included
    assert config == searched.search_config(dataclasses.replace(one, search=one.measure["search"]))
    assert config is not None and config.seed == 2000 and config.trials == 12
    assert search_config(run).storage is None  # a relearn study lives in a temporary journal
    with pytest.raises(SpecdefError, match=r"measure\.search: .*Did you mean: trials"):
        search_config(expand(load_config("table1", ["measure.search.trails=3"]))[0])
    with pytest.raises(SpecdefError, match=r"measure\.search: .*needs trials"):
        search_config(expand(load_config("table1", ["measure.search={lr_low: 1.0e-3}"]))[0])
    with pytest.raises(SpecdefError, match="stability_edge is read only by an attack"):
        search_config(expand(load_config("table1", ["measure.search.stability_edge=true"]))[0])
