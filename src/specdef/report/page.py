"""``results.jsonl`` → ``report.md`` with tables and PNG plots. A pure function of the rows.

This module imports no training code (no torch, no transformers): a report can be rebuilt anywhere
from the results file alone. The row fields it reads are listed in ``docs/ARCHITECTURE.md``
("Results rows"). Rows of three kinds are reported:

- ``attack``: loss curves defended vs. undefended per optimizer × learning rate, steps to the
  threshold (median over seeds, censoring and divergence stated), the attacker's best learning rate
  and the slowdown factor, benign utility before / after, and informed attacks' parameter cost;
- ``curvature``: σ₁(H) (exact and estimated) and the certified lower bounds vs. α;
- ``utility``: function gap, metric deltas and the precision guard's verdict vs. α × dtype;
- search trials (attack rows with a ``study``), ``stability-edge`` and ``search-failure`` rows:
  the worst-case attacker's slowdown vs threshold, trials needed, edges and figures
  (:mod:`specdef.report.search`).

The page is assembled here; the sections come from :mod:`specdef.report.attack` and
:mod:`specdef.report.measure`, the markdown helpers from :mod:`specdef.report.markdown` (their
public names are re-exported here), the figures from :mod:`specdef.report.plots`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from specdef.errors import SpecdefError
from specdef.report.attack import (
    attack_sections,
    normalize,
)
from specdef.report.markdown import Report, Row
from specdef.report.measure import curvature_section, utility_section
from specdef.report.search import is_search_row, search_section
from specdef.utils.files import read_jsonl, write_text_atomic


def build_report(rows: list[Row], out_dir: str | Path, *, title: str = "specdef report") -> Report:
    """Write PNG figures into ``out_dir`` and return the report (markdown references them by name)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(markdown="")
    experiments = sorted({str(r.get("experiment")) for r in rows})
    wall = sum(float(r.get("wall_s") or 0.0) for r in rows)
    sections = [
        f"# {title}\n",
        f"{len(rows)} runs from experiment(s) {', '.join(experiments)}; summed run time "
        f"{wall / 60:.1f} min (per-run `wall_s`, excluding process start-up).\n",
    ]
    by_kind: dict[str, list[Row]] = defaultdict(list)
    searched: list[Row] = []
    for r in rows:
        kind = str(r.get("kind", "attack"))
        if is_search_row(r):
            searched.append(r)
            continue
        by_kind[kind].append(normalize(r) if kind == "attack" else r)
    edges = by_kind.pop("stability-edge", [])
    failures = len(by_kind.pop("search-failure", []))
    if searched:
        sections.append(search_section(searched, out, report, edges=edges, failures=failures))
    elif edges:
        sections.append(f"{len(edges)} stability-edge row(s) without search trials.\n")
    if by_kind.get("curvature"):
        sections.append(curvature_section(by_kind["curvature"], out, report))
    if by_kind.get("utility"):
        sections.append(utility_section(by_kind["utility"], out, report))
    if by_kind.get("attack"):
        sections.extend(attack_sections(by_kind["attack"], out, report))
    unknown = sorted(set(by_kind) - {"attack", "curvature", "utility"})
    if unknown:
        sections.append(f"Rows of unknown kind(s) not reported: {', '.join(unknown)}.\n")
    gits = sorted({str((r.get("provenance") or {}).get("git", "unknown")) for r in rows})
    sections.append(f"\nProvenance: git {', '.join(gits)}.\n")
    report.markdown = "\n".join(sections)
    return report


def write_report(
    run_dir: str | Path, *, out: str | Path | None = None, title: str | None = None
) -> Path:
    """Read ``RUN_DIR/results.jsonl`` and write ``report.md`` + PNGs into ``out`` (default RUN_DIR).
    Returns the path of ``report.md``."""
    source = Path(run_dir)
    results = source / "results.jsonl" if source.is_dir() else source
    rows = read_jsonl(results)
    if not rows:
        raise SpecdefError(
            f"No finished runs in {str(results)!r}; run `specdef run CONFIG` first or check the path."
        )
    target = Path(out) if out is not None else results.parent
    name = title or f"Results: {', '.join(sorted({str(r.get('experiment')) for r in rows}))}"
    report = build_report(rows, target, title=name)
    path = target / "report.md"
    write_text_atomic(path, report.markdown)
    return path
