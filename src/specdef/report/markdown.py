"""Markdown for :mod:`specdef.report.page`: the :class:`Report` being assembled, number cells and
tables, and the α of a results row. Shared by every section; imports no training code."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclass
class Report:
    """What :func:`specdef.report.page.build_report` produced: the markdown text, the figures and the tables' names."""

    markdown: str
    figures: list[Path] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def embed(self, figure: Path | None, alt: str) -> list[str]:
        """Record ``figure`` (``None``: the plot had nothing to draw) and return the markdown lines
        that show it, none when there is no figure."""
        if figure is None:
            return []
        self.figures.append(figure)
        return [f"\n![{alt}]({figure.name})\n"]


def fmt_num(value: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (``—`` for missing)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.{digits}g}"
        return f"{value:.{max(digits - 1, 1)}e}"
    return str(value)


def alpha_label(alpha: Any) -> str:
    return "undefended" if alpha is None else f"α={float(alpha):.0e}"


def md_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    cells = [[c if isinstance(c, str) else fmt_num(c) for c in row] for row in rows]
    head = "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n"
    return head + "".join("| " + " | ".join(r) + " |\n" for r in cells)


def row_alpha(row: Row) -> float | None:
    """The row's α (``None``: undefended), read from ``defense.alpha`` when the row has none."""
    if "alpha" in row:
        return None if row["alpha"] is None else float(row["alpha"])
    defense = row.get("defense") or {}
    return None if defense.get("alpha") is None else float(defense["alpha"])


def alpha_key(alpha: float | None) -> float:
    """Sort key that puts the undefended model first."""
    return -1.0 if alpha is None else alpha
