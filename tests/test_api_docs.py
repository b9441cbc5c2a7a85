"""docs/api.md's examples run: every ```python block, in order, in one namespace, in a scratch
directory — so the documented Python API (``specdef.__all__``) cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import specdef

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_an_example_per_concept() -> None:
    code = "\n".join(BLOCKS)
    for call in ("defend(", "verify(", "run_attack(", "run_search(", "measure_curvature(",
                 "detect_checkpoint(", "run_defense(", "from_pretrained("):  # fmt: skip
        assert call in code, call
    for name in (
        "defend",
        "verify",
        "run_attack",
        "run_search",
        "measure_curvature",
        "run_defense",
    ):
        assert name in specdef.__all__


def test_api_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for i, block in enumerate(BLOCKS):
        exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)
    assert (tmp_path / "OUT" / "tamperbench" / "README.md").is_file()
    assert (tmp_path / "OUT" / "search" / "results.jsonl").is_file()
