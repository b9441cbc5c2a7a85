"""``specdef report``: a fixture ``results.jsonl`` → every table and plot; pure function of rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specdef.cli import main
from specdef.report.attack import normalize, steps_cell
from specdef.report.page import build_report, write_report
from specdef.utils.files import read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "results.jsonl"


def _png_ok(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_has_every_table_and_plot(tmp_path: Path) -> None:
    report = build_report(read_jsonl(FIXTURE), tmp_path)
    assert report.tables == [
        "curvature: sigma1 and bounds",
        "utility: function gap and deltas",
        "attack0: steps to threshold",
        "attack0: best learning rate and slowdown",
        "attack0: benign utility",
        "attack0: parameter cost",
    ]
    names = sorted(p.name for p in report.figures)
    assert names == ["attack0_curves.png", "curvature_sigma1.png", "utility_gap.png"]
    for figure in report.figures:
        assert _png_ok(figure)
        assert f"]({figure.name})" in report.markdown


def test_steps_table_values_follow_the_rows(tmp_path: Path) -> None:
    rows = read_jsonl(FIXTURE)
    md = build_report(rows, tmp_path).markdown
    # Recompute one cell independently: undefended AdamW at lr 1e-3, median over seeds.
    mine = [
        r
        for r in rows
        if r["kind"] == "attack"
        and r["alpha"] is None
        and r["optimizer"] == "adamw"
        and r["lr"] == 1e-3
    ]
    reached = sorted(r["steps_to_threshold"] for r in mine)
    expected = (reached[0] + reached[1]) / 2
    assert f"| adamw | 0.001 | {expected:g} | >40 |" in md
    # Divergence and censoring are stated, not hidden.
    assert "diverged@5 (2/2)" in md
    assert ">8× (censored at 40)" in md
    # Informed attacks sit beside the undefended and defended columns, with their parameter cost.
    assert "α=1e+04 + inject" in md and "| inject | 1000 | 1200 | 200 | 20.00 |" in md


def test_steps_cell_partial_and_never() -> None:
    rows = [
        {"steps_to_threshold": 10, "censored": False, "steps": 50},
        {"steps_to_threshold": 30, "censored": False, "steps": 50},
        {"steps_to_threshold": None, "censored": True, "steps": 50},
    ]
    assert steps_cell(rows) == "20 (2/3)"
    assert steps_cell(rows[2:]) == ">50"


def test_normalize_flattens_attack_result_rows() -> None:
    row = {
        "run_id": "x",
        "kind": "attack",
        "alpha": None,
        "spec": {"optimizer": "sgd", "lr": 0.1, "steps": 20, "threshold": "harmful_loss<=1.5"},
        "summary": {"steps_to_threshold": None, "censored": True, "diverged_at": 3},
        "evals": [
            {"step": 0, "harmful_loss": 2.0, "benign_loss": 0.4},
            {"step": 3, "benign_loss": 9.0},
        ],
    }
    flat = normalize(row)
    assert flat["optimizer"] == "sgd" and flat["metric"] == "harmful_loss"
    assert flat["threshold"] == 1.5 and flat["diverged_at"] == 3
    assert flat["before"] == {"benign_loss": 0.4} and flat["after"] == {"benign_loss": 9.0}


def test_report_imports_no_training_code() -> None:
    code = (
        "import sys, specdef.report.page, specdef.report.plots\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'specdef.attack.loop') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_report_writes_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.jsonl").write_text(FIXTURE.read_text())
    assert main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").exists()
    assert str(tmp_path / "out" / "report.md") in capsys.readouterr().out


def test_cli_report_empty_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No finished runs" in err and "Traceback" not in err
    assert not (tmp_path / "report.md").exists()


def test_write_report_default_out_is_run_dir(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    path = write_report(tmp_path)
    assert path == tmp_path / "report.md" and "steps to the threshold" in path.read_text()
