"""Experiment configs: load every shipped config, --set overrides, grid expansion, resumable runs,
and every experiment end to end on a miniature override (real zoo models and data, tiny sizes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from specdef.cli import main
from specdef.errors import SpecdefError
from specdef.experiments.config import (
    apply_overrides,
    config_from_mapping,
    expand,
    load_config,
    shipped_configs,
)
from specdef.experiments.run import run_experiment
from specdef.utils.files import read_jsonl

CONFIGS = shipped_configs()
NAMES = [p.stem for p in CONFIGS]

# Documented grid sizes (undefended runs are not repeated across defense-only axes).
EXPECTED_RUNS = {
    "E1-bound": 2 * 5,
    "E2-vision": 3 * 4 * 3,  # searched: variants × optimizers × seeds, one study each
    "E2-alpha": 3 * 4 * 3,  # E2's α sweep (undefended, α = 1e2, 1e6), searched the same way
    "E3-language": 3 * 2 * 2,  # searched: optimizer × α × seed cells
    "E4-lora": 2 * 2 * 3,
    "E5-second-order": 21 * 2 * 3,  # searched: optimizer × α × seed cells
    "E6-informed": 9 * 4 * 3,
    "E7-utility": 2 * 3 * 3,
    # the studies behind docs/results/informed_attacks.md and native_vs_algorithm1.md
    "informed-detection": 3 * (1 + 3 * 2 * 2),  # models × (undefended + selection × α × view)
    "informed-detection-smollm2": 2,
    # undefended + 2 controls + 2 selections × (11 at α = 1e4 + 3 α × 4), × 7 lr × 3 seeds
    "informed-digits": (1 + 2 + 2 * (11 + 3 * 4)) * 7 * 3,
    "informed-smollm2": 9 * 3,
    "native-digits": 6,
    "native-digits-attack": 6 * 2 * 5,
    "native-smollm2": 6,
    "native-smollm2-attack": 6 * 5,
    # the optimizer grid of docs/attacks.md: 3 model variants × 19 optimizer × lr pairs, ablations
    "attack-digits": 3 * 19,
    "attack-digits-ablation": 3 * 8,
    # LoRA targets × lr × (undefended, α = 1e4) on tiny-llama-perm; K-FAC: 3 α × 3 seeds
    "attack-lora-perm": 2 * 3 * 2,
    "attack-kfac-digits": 3 * 3,
    # docs/results/table1.md: 9 registry defenses (undefended included) × 3 seeds, on mlp-digits
    # and on an MLP that learned all ten digits first
    "table1": 2 * 9 * 3,
}
STUDIES = ("informed-", "native-", "attack-", "table1")


def test_every_experiment_has_one_config() -> None:
    claims = sorted(n.split("-")[0] for n in NAMES if not n.startswith(STUDIES))
    # one config per experiment; E2's α sweep (docs/results/E2-vision.md) is its second part
    assert claims == sorted([f"E{i}" for i in range(1, 8)] + ["E2"])
    assert sorted(n for n in NAMES if n.startswith("E2-")) == ["E2-alpha", "E2-vision"]
    assert sorted(EXPECTED_RUNS) == sorted(NAMES)


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_shipped_config_loads_and_expands(path: Path) -> None:
    text = path.read_text()
    assert "Measured wall time on 2 cores" in text.split("\nname:")[0]
    config = load_config(path)
    assert config.name == path.stem
    runs = expand(config)
    assert len(runs) == EXPECTED_RUNS[config.name]
    assert len({r.run_id for r in runs}) == len(runs)
    for run in runs:
        if run.defense.get("alpha") is None and run.defense.get("name") is None:
            assert run.defense == {"alpha": None}


def test_yaml_floats_and_set_values() -> None:
    data = {"name": "x", "kind": "attack", "model": "mlp-digits", "task": "digits-harmful"}
    out = apply_overrides(
        data, ["attack.lr=1e-3", "seeds=[0, 2]", "defense.alpha=null", "attack.train=lora"]
    )
    assert out["attack"]["lr"] == pytest.approx(1e-3) and isinstance(out["attack"]["lr"], float)
    assert out["seeds"] == [0, 2] and out["defense"]["alpha"] is None
    assert out["attack"]["train"] == "lora"


def test_set_pins_a_grid_axis() -> None:
    config = load_config("E2-vision", ["attack.lr=0.01", "seeds=[0]"])
    runs = expand(config)
    assert {r.attack["lr"] for r in runs} == {0.01}
    assert len(runs) == 4 * 3
    # and inside `variants`: the override wins over each variant's value
    e6 = expand(load_config("E6", ["defense.alpha=100", "grid.attack.lr=[1e-3]", "seeds=[0]"]))
    assert {r.defense["alpha"] for r in e6} == {100}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("atack.steps=3", r"Unknown config key 'atack'. Did you mean: attack"),
        ("attack.steps", r"Expected --set KEY=VALUE"),
        ("name.x=1", r"'name' is a value, not a section"),
    ],
)
def test_bad_overrides_are_user_errors(override: str, message: str) -> None:
    with pytest.raises(SpecdefError, match=message):
        load_config("E2-vision", [override])


def test_bad_configs_are_user_errors(tmp_path: Path) -> None:
    base = {"name": "x", "kind": "attack", "model": "m", "task": "t"}
    with pytest.raises(SpecdefError, match="Did you mean: attack"):
        config_from_mapping({**base, "kind": "atack"})
    with pytest.raises(SpecdefError, match="'x' \\(attack\\) needs a task"):
        config_from_mapping({k: v for k, v in base.items() if k != "task"})
    with pytest.raises(SpecdefError, match=r"Grid axis .attack\.lr."):
        config_from_mapping({**base, "grid": {"attack": {"lr": []}}})
    with pytest.raises(SpecdefError, match="No config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(SpecdefError, match=r"'E2' names 2 shipped configs \(E2-alpha, E2-vision\)"):
        load_config("E2")
    assert load_config("E1").name == "E1-bound"  # an unambiguous prefix still resolves


def test_resume_skips_finished_and_repairs_a_cut_line(tmp_path: Path) -> None:
    config = load_config(
        "E2-vision",
        [
            "search=null",  # E2 is a searched config; this test is about the grid's resume
            "seeds=[0]",
            "attack.steps=2",
            "grid.attack.optimizer=[sgd]",
            "grid.attack.lr=[0.1]",
            "grid.variants=[{defense.alpha: null}, {defense.alpha: 1.0e+4}]",
        ],
    )
    first = run_experiment(config, run_dir=tmp_path, limit=1)
    assert (first.ran, first.total) == (1, 2)
    with open(tmp_path / "results.jsonl", "a") as handle:
        handle.write('{"run_id": "half-writ')  # a kill mid-write
    second = run_experiment(config, run_dir=tmp_path)
    assert (second.ran, second.skipped) == (1, 1)
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in expand(config))
    assert all(line.startswith('{"run_id"') for line in (tmp_path / "results.jsonl").open())
    assert run_experiment(config, run_dir=tmp_path).ran == 0
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["attack"]["steps"] == 2
    other = load_config("E2-vision", ["seeds=[1]"])
    with pytest.raises(SpecdefError, match="different resolved config"):
        run_experiment(other, run_dir=tmp_path)


_TINY_VIT = "{name: v, architecture: vit, image_size: 8, patch_size: 4, dim: 8, depth: 1, heads: 2, mlp_ratio: 2, num_classes: 10}"
_TINY_MLP = "{name: m, architecture: mlp, in_features: 64, hidden: [8], out_features: 10}"
MINIATURE = {
    "E1-bound": [
        f"grid.model=[{_TINY_MLP}, {_TINY_VIT}]",
        "grid.defense.alpha=[null, 100]",
        "data.pretrain.steps=5",
        "measure.batch_size=16",
        "measure.lanczos_iter=15",
    ],
    "E2-vision": [  # one trial per study: as many rows as cells
        "search.optimizers=[sgd]",
        "search.trials=1",
        "search.stability_edge=false",
        "grid.variants=[{defense.alpha: null}, {defense.alpha: 1.0e4, defense.mode: native}]",
    ],
    "E2-alpha": [
        "search.optimizers=[sgd]",
        "search.trials=1",
        "search.stability_edge=false",
        "grid.variants=[{defense.alpha: null}, {defense.alpha: 1.0e6}]",
    ],
    "E3-language": [
        "model=tiny-llama",
        "grid.attack.optimizer=[adamw]",
        "search.trials=1",
        "data.max_length=96",
        "data.eval_limit=2",
    ],
    "E4-lora": [
        "model=tiny-llama",
        "grid.attack.lr=[1e-3]",
        "data.max_length=96",
        "data.eval_limit=2",
    ],
    "E5-second-order": [
        "grid.attack.optimizer=[adam]",
        "search.trials=1",
        "search.stability_edge=false",
        "attack.batch_size=16",
    ],
    "E6-informed": ["grid.attack.lr=[1e-3]"],
    "E7-utility": [
        "grid.variants=[{model: mlp-digits, task: digits}, {model: tiny-llama, task: benign-text,"
        " defense.targets: 'preset:llama', defense.top_k: 4, measure.splits: [benign-text]}]",
        "grid.defense.alpha=[1e3, 1e9]",
        "grid.measure.dtype=[fp32, bf16]",
        "data.max_length=96",
        "data.eval_limit=2",
    ],
    "informed-detection": ["grid.model=[mlp-digits]"],
    "informed-detection-smollm2": ["model=tiny-llama", "defense.top_k=4"],
    "informed-digits": [
        "grid.attack.lr=[0.1]",
        "grid.variants=[{defense.alpha: null}, {defense.alpha: 1.0e4, attack.adaptive: fuse},"
        " {defense.alpha: 1.0e4, attack.adaptive: untouched},"
        " {defense.alpha: null, attack.adaptive: 'control:inject@layers.2'}]",
    ],
    "informed-smollm2": [
        "model=tiny-llama",
        "defense.top_k=4",
        "grid.attack.lr=[1e-4]",
        "data.max_length=96",
        "data.eval_limit=2",
        "grid.variants=[{defense.alpha: null}, {defense.alpha: 1.0e4, attack.adaptive: fuse},"
        " {defense.alpha: null, attack.adaptive: 'control:inject@preset:llama'}]",
    ],
    "native-digits": ["measure.lanczos_iter=10", "measure.batch_size=32"],
    "native-digits-attack": ["grid.attack.optimizer=[adam]", "grid.attack.lr=[0.1]"],
    "native-smollm2": [
        "model=tiny-llama",
        "defense.top_k=4",
        "data.eval_limit=2",
        "measure.lanczos_iter=3",
    ],
    "attack-digits": ["grid.variants=[{attack.optimizer: sgd, attack.lr: 0.1}]"],
    "attack-digits-ablation": [
        "grid.variants=[{defense.alpha: 1.0e4, defense.targets: [layers.2], attack.train: untouched,"
        " attack.optimizer: adam, attack.lr: 0.01}]"
    ],
    "attack-lora-perm": [
        "grid.attack.lr=[1e-2]",
        "grid.attack.lora_targets=[all-linear]",
        "data.pretrain={optimizer: adamw, lr: 1.0e-2, steps: 2, batch_size: 8, eval_every: 2}",
    ],
    "attack-kfac-digits": ["grid.defense.alpha=[null, 1.0e4]"],
    "native-smollm2-attack": [
        "model=tiny-llama",
        "defense.top_k=4",
        "data.eval_limit=2",
        "grid.attack.lr=[1e-3]",
    ],
    "table1": [
        "grid.variants=[{defense.name: null}, {defense.name: gradient-ascent, defense.steps: 2},"
        " {model: {name: mlp-digits10, architecture: mlp, in_features: 64, hidden: [64, 64],"
        " out_features: 10}, data: {pretrain: {optimizer: adam, lr: 1.0e-3, steps: 5,"
        " batch_size: 64, eval_every: 5}, pretrain_task: digits}, defense.name: npo,"
        " defense.steps: 2}]",
        "measure.lrs=[1e-3]",
        "measure.search.trials=1",
        "measure.curvature.max_hvps=3",
    ],
}
COMMON = ["seeds=[0]", "attack.steps=2", "attack.eval_every=1"]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_every_experiment_runs_end_to_end_in_miniature(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = COMMON + MINIATURE[path.stem]
    argv = ["run", str(path), "--out", str(tmp_path), "--report", "--json"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    expected = len(expand(load_config(path, overrides)))
    assert out["ran"] == expected > 0
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert len(rows) == expected
    kind = load_config(path).kind
    for row in rows:
        assert row["kind"] == kind and row["provenance"]["versions"]
        if kind == "attack" and row.get("error"):
            assert row["error"] == "nothing to train" and row["adaptive"] == "untouched"
        elif kind == "attack":
            assert row["summary"]["steps_run"] >= 1 and row["evals"]
        elif kind == "detection":
            assert row["false_positives"] == row["false_negatives"] == 0
            assert row["true_positives"] == row["truth"]
        elif kind == "landscape":
            assert row["function_gap"] < 1e-2 and row["sigma1"] > 0
        elif kind == "relearn":
            assert row["grid"] and row["search"]["trained"] == 1 and row["curvature"]["hvps"] <= 3
        elif kind == "curvature":
            exact, estimate = row["sigma1_exact"], row["sigma1"]
            assert exact is not None and estimate <= exact * (1 + 1e-6)
            assert row["bounds_hold"]
        else:
            assert row["function_gap"] >= 0 and isinstance(row["guard_accepted"], bool)
    if kind == "curvature":  # σ₁(H) grows with α even in miniature (exact dense Hessian)
        for model in {r["model"] for r in rows}:
            by_alpha = {r["alpha"]: r["sigma1_exact"] for r in rows if r["model"] == model}
            assert by_alpha[100] > 10 * by_alpha[None]
    if kind == "utility":  # fp32 keeps α=1e3; bf16 at α=1e9 is refused by the guard
        verdict = {(r["model"], r["dtype"], r["alpha"]): r["guard_accepted"] for r in rows}
        assert verdict[("mlp-digits", "fp32", 1e3)] and not verdict[("mlp-digits", "bf16", 1e9)]
    report = (tmp_path / "report.md").read_text()
    if kind in ("attack", "curvature", "utility"):  # the study kinds render into their pages
        assert "![" in report and list(tmp_path.glob("*.png"))
    assert main(argv) == 0  # resume: nothing left to run
    assert json.loads(capsys.readouterr().out)["ran"] == 0


@pytest.mark.slow
def test_demo_ends_with_a_report_and_a_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "demo" / "report.md"
    assert f"report: {report}" in out and "PASS: function gap" in out
    assert "SpecDef α=1e4" in out and "informed fuse" in out
    text = report.read_text()
    assert "![loss curves" in text and (tmp_path / "demo" / "attack0_curves.png").exists()
    rows = read_jsonl(tmp_path / "demo" / "results.jsonl")
    assert len(rows) == 9
    # the demo's headline: undefended reaches the threshold at some lr, plain-defended at none
    reached = {
        (r["alpha"], r.get("adaptive")): r["summary"]["steps_to_threshold"]
        for r in rows
        if r["summary"]["steps_to_threshold"]
    }
    assert (None, None) in reached and (1e4, None) not in reached
    # and fusing the pairs back (the informed attacker) is exactly as fast as undefended
    assert reached[(1e4, "fuse")] == reached[(None, None)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("defense.alhpa=1e4", r"Unknown defense key 'alhpa'. Did you mean: alpha"),
        ("attack.optimzer=adam", r"Unknown attack key 'optimzer'. Did you mean: optimizer"),
        ("attack.steps=forty", r"attack has a value of the wrong type|steps"),
    ],
)
def test_dry_run_validates_every_run_before_anything_is_written(
    tmp_path: Path, override: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from specdef.cli import main

    for args in (["--dry-run"], ["--out", str(tmp_path / "run")]):
        assert main(["run", "E2-vision", "--set", override, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err
        assert not (tmp_path / "run").exists()


def test_non_integer_seeds_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from specdef.cli import main

    for seeds in ("[0.5, 1.7]", "[a, b]"):
        assert main(["run", "E2-vision", "--set", f"seeds={seeds}", "--dry-run"]) == 2
        assert "seeds must be integers" in capsys.readouterr().err


def test_every_shipped_config_validates() -> None:
    from specdef.experiments.config import expand, load_config, shipped_configs
    from specdef.experiments.runners import validate_runs

    for path in shipped_configs():
        validate_runs(expand(load_config(path)))
