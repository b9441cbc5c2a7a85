"""User YAML is bounded before it is built: alias bombs and recursive anchors are one-line errors,
ordinary configs (anchors included) load exactly as PyYAML's safe loader reads them."""

from __future__ import annotations

import time

import pytest
import yaml

from specdef.errors import SpecdefError
from specdef.utils.safe_yaml import MAX_BYTES, load_yaml


def _bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_plain_configs_match_the_safe_loader() -> None:
    text = "base: &b {lr: 1e-3, steps: 40}\nruns:\n  - *b\n  - {<<: *b, lr: 0.1}\nseeds: [0, 1]\n"
    data = load_yaml(text, what="cfg")
    assert data["runs"][0] == {"lr": 1e-3, "steps": 40}  # 1e-3 is a float here
    assert data["runs"][1]["lr"] == 0.1 and data["seeds"] == [0, 1]
    expected = yaml.safe_load(text.replace("1e-3", "1.0e-3"))
    assert data == expected
    assert load_yaml("", what="cfg") is None


def test_alias_bomb_is_refused_fast() -> None:
    text = _bomb(9)  # 10**9 values once expanded, under 1 KB on disk
    assert len(text) < 1024
    start = time.perf_counter()
    with pytest.raises(SpecdefError, match="expands to more than"):
        load_yaml(text, what="bomb.yaml")
    assert time.perf_counter() - start < 5  # linear in the file, not in the expansion


def test_recursive_anchor_and_deep_nesting_are_refused() -> None:
    with pytest.raises(SpecdefError, match="recursive anchor"):
        load_yaml("a: &a [1, *a]\n", what="r.yaml")
    with pytest.raises(SpecdefError, match="levels"):
        load_yaml("x: " + "[" * 80 + "]" * 80 + "\n", what="deep.yaml")


def test_size_and_syntax_errors_are_one_line() -> None:
    with pytest.raises(SpecdefError, match="larger than"):
        load_yaml("a: " + "x" * (MAX_BYTES + 1), what="big.yaml")
    with pytest.raises(SpecdefError, match=r"Cannot parse bad.yaml as YAML") as err:
        load_yaml("a: [1, 2\n", what="bad.yaml")
    assert "\n" not in str(err.value)


def test_run_dry_run_refuses_a_bomb_in_one_line(tmp_path, capsys) -> None:
    from specdef.cli import main

    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(9))
    start = time.perf_counter()
    assert main(["run", str(path), "--dry-run"]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expands to more than" in err[0]
    path.write_text("a: &a [1, *a]\n")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "recursive anchor" in capsys.readouterr().err
