"""The kinds the informed-attacker studies add (``detection``, ``landscape``), the variants they
run (``defense.mode: native``, ``attack.adaptive`` on a landscape, the ``control:inject`` control)
and the attack kind's "nothing to train" outcome — on tiny models and the digits MLP, checked
against oracles computed here (the defended layers, a dense float64 Hessian, shapes)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from specdef.curvature import dense_hessian
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import count_parameters
from specdef.errors import SpecdefError
from specdef.experiments.config import config_from_mapping, expand
from specdef.experiments.kinds import execute
from specdef.experiments.runners import load_run_model, load_run_task
from specdef.experiments.studies import run_detection_kind


def _runs(**fields: Any) -> list[Any]:
    return expand(config_from_mapping({"name": "t", "seeds": [0], **fields}))


def test_detection_kind_scores_against_the_defended_layers():
    runs = _runs(
        kind="detection",
        model="mlp-digits",
        defense={"alpha": None, "top_k": 4, "seed": 7},
        grid={
            "variants": [
                {"defense.alpha": None},
                {"defense.alpha": 1e2, "defense.n_random": 1, "measure.view": "renamed"},
                {"defense.alpha": 1e4},
            ]
        },
    )
    rows = [execute(r) for r in runs]
    none, one, every = rows
    assert (none["truth"], none["true_positives"], none["false_positives"]) == (0, 0, 0)
    assert none["suspects"] == 0 and none["min_alignment"] is None
    assert (one["truth"], one["true_positives"], one["false_negatives"]) == (1, 1, 0)
    assert one["view"] == "renamed" and one["alpha_estimates"] == [pytest.approx(100, rel=1e-3)]
    assert (every["truth"], every["true_positives"], every["false_positives"]) == (3, 3, 0)
    assert every["layers"] == 6  # three inflated layers and their three compensations


def test_detection_needs_no_task_but_other_kinds_do():
    assert _runs(kind="detection", model="mlp-digits")[0].task == ""
    with pytest.raises(SpecdefError, match="needs a task"):
        _runs(kind="attack", model="mlp-digits")
    bad = _runs(kind="detection", model="mlp-digits", measure={"view": "renamd"})[0]
    with pytest.raises(SpecdefError, match="Did you mean: renamed"):
        run_detection_kind(bad)


TINY_MLP = {
    "name": "m",
    "architecture": "mlp",
    "in_features": 64,
    "hidden": [8],
    "out_features": 10,
}


def test_landscape_variants_against_a_dense_hessian():
    """Undefended, Algorithm 1, native, and their informed undos on a tiny MLP: σ₁ (Lanczos) against
    the dense float64 Hessian on the same batch, sizes against the layer shapes, the native
    imbalance ≈ log10 α, and the function kept."""
    alpha = 1e2
    runs = _runs(
        kind="landscape",
        model=TINY_MLP,
        task="digits-harmful",
        defense={"alpha": None, "top_k": 2, "force": True},
        measure={"batch_size": 32, "lanczos_iter": 60},
        grid={
            "variants": [
                {"defense.alpha": None},
                {"defense.alpha": None, "attack.adaptive": "rebalance"},
                {"defense.alpha": alpha, "defense.targets": ["layers.0"]},
                {
                    "defense.alpha": alpha,
                    "defense.targets": ["layers.0"],
                    "attack.adaptive": "fuse",
                },
                {"defense.alpha": alpha, "defense.mode": "native"},
                {"defense.alpha": alpha, "defense.mode": "native", "attack.adaptive": "rebalance"},
            ]
        },
    )
    rows = {
        (r.defense.get("mode", "a1" if r.defended else "none"), r.attack.get("adaptive")): execute(
            r
        )
        for r in runs
    }
    original = count_parameters(load_run_model(runs[0]))
    assert rows[("a1", None)]["parameters"]["attacked"] == original + 8 * 8  # one 8×8 compensation
    for key in (("none", None), ("none", "rebalance"), ("a1", "fuse"), ("native", None)):
        assert rows[key]["parameters"]["attacked"] == original
    for key, row in rows.items():
        assert row["function_gap"] <= 1e-5, key
        assert row["converged"], key
    assert "imbalance_log10" not in rows[("a1", None)]  # compensation layers: not a native pair
    assert rows[("native", None)]["imbalance_log10"] == pytest.approx(math.log10(alpha), abs=0.6)
    assert rows[("native", "rebalance")]["imbalance_log10"] <= 1e-3
    task = load_run_task(runs[0])
    batch = next(task.train_batches(batch_size=32, seed=0))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    defended = copy.deepcopy(load_run_model(runs[0]))  # rebuilt here, not by the runner
    apply_specdef_(defended, SpecDefConfig(alpha=alpha, top_k=2, targets=("layers.0",), force=True))
    for key, model in ((("none", None), load_run_model(runs[0])), (("a1", None), defended)):
        hessian = dense_hessian(copy.deepcopy(model).double(), task.loss, [batch])
        exact = float(torch.linalg.eigvalsh(hessian).abs().max())
        assert rows[key]["sigma1"] == pytest.approx(exact, rel=1e-6), key
    undefended = rows[("none", None)]["sigma1"]
    assert rows[("a1", None)]["sigma1"] > 10 * undefended
    assert rows[("native", None)]["sigma1"] > 10 * undefended
    assert rows[("a1", "fuse")]["sigma1"] == pytest.approx(undefended, rel=1e-3)
    assert rows[("native", "rebalance")]["sigma1"] == pytest.approx(
        rows[("none", "rebalance")]["sigma1"], rel=1e-2
    )


def test_unknown_defense_mode_is_a_user_error():
    run = _runs(
        kind="landscape",
        model=TINY_MLP,
        task="digits-harmful",
        defense={"alpha": 10.0, "top_k": 2, "mode": "natve"},
    )[0]
    with pytest.raises(SpecdefError, match="Did you mean: native"):
        execute(run)


def test_attack_kind_runs_the_control_and_records_nothing_to_train():
    runs = _runs(
        kind="attack",
        model="mlp-digits",
        task="digits-harmful",
        defense={"alpha": None, "top_k": 8},
        attack={"optimizer": "adam", "lr": 1e-3, "steps": 2, "batch_size": 16, "eval_every": 1},
        grid={
            "variants": [
                {"defense.alpha": 1e4, "attack.adaptive": "untouched"},  # every layer defended
                {"defense.alpha": None, "attack.adaptive": "control:inject@layers.2"},
            ]
        },
    )
    untouched, control = (execute(r) for r in runs)
    assert untouched["error"] == "nothing to train" and untouched["trainable_parameters"] == 0
    params = untouched["parameters"]
    assert params["released"] == params["attacked"] > params["original"]
    assert control["cost"]["params_added"] == 128 * 128 + 128  # one identity 128×128 adapter
    assert control["parameters"]["released"] == control["parameters"]["original"]
    # layers.2 itself is frozen and its adapter (the same size) trains instead
    assert control["summary"]["trainable_parameters"] == control["parameters"]["original"]
    assert control["summary"]["steps_run"] == 2
