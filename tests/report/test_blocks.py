"""``specdef report --page``: generated blocks inside a hand-written page are re-rendered from the
rows of the run directories they name; blocks without rows are kept as published; the prose is
never touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdef.cli import main
from specdef.errors import SpecdefError
from specdef.report.blocks import END, update_page


def _detection_row(model: str, truth: int, found: int, suspects: int = 0) -> dict:
    return {
        "kind": "detection", "model": model, "alpha": 1e4 if truth else None, "view": "model",
        "defense": {"alpha": 1e4 if truth else None, "targets": "all-linear"},
        "truth": truth, "true_positives": found, "false_positives": 0,
        "false_negatives": truth - found, "suspects": suspects, "unpaired_compensations": 0,
        "seconds": 0.5, "min_alignment": 1.0 if found else None, "alpha_estimates": [1e4] * bool(found),
    }  # fmt: skip


def _write_rows(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


PAGE = f"""# A page

Hand-written prose that stays.

<!-- specdef report: detection runs/a -->
stale table
{END}

More prose.

<!-- specdef report: detection runs/missing -->
the published table
{END}
"""


def test_blocks_render_from_their_rows_and_keep_the_rest(tmp_path: Path) -> None:
    # 3 defended pairs, 2 found, 1 suspect: precision 2/3, recall 2/3 (computed by hand)
    _write_rows(tmp_path / "runs" / "a", [_detection_row("m", 0, 0), _detection_row("m", 3, 2, 1)])
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    update = update_page(page, root=tmp_path)
    assert update.rendered == ("detection",)
    assert update.kept == (("detection", "no rows in runs/missing"),)
    text = page.read_text()
    assert "stale table" not in text and "the published table" in text
    assert "Hand-written prose that stays." in text and "More prose." in text
    assert "**Over 2 cases: precision 0.667, recall 0.667** (2 defended pairs found, 1 missed, " \
        "1 false positives)." in text  # fmt: skip
    assert text.count(END) == 2 and text.count("<!-- specdef report: detection") == 2
    stamp = page.stat().st_mtime_ns
    assert update_page(page, root=tmp_path).rendered == ("detection",)
    assert page.stat().st_mtime_ns == stamp  # nothing changed: not rewritten


def test_page_errors_are_user_errors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# no blocks\n")
    with pytest.raises(SpecdefError, match="no specdef report block"):
        update_page(page)
    _write_rows(tmp_path / "runs" / "a", [_detection_row("m", 0, 0)])
    page.write_text(f"<!-- specdef report: detecton runs/a -->\nx\n{END}\n")
    with pytest.raises(SpecdefError, match="Did you mean: detection"):
        update_page(page, root=tmp_path)
    with pytest.raises(SpecdefError, match="No page"):
        update_page(tmp_path / "absent.md")


def test_cli_report_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_rows(tmp_path / "runs" / "a", [_detection_row("m", 1, 1)])
    (tmp_path / "page.md").write_text(PAGE)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--page", "page.md"]) == 0
    out = capsys.readouterr().out
    assert "rendered: detection" in out and "kept as published: detection" in out
    assert main(["report", "runs/a", "--page", "page.md"]) == 2
    assert main(["report"]) == 2
