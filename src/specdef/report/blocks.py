"""Generated blocks inside a hand-written results page. A block names the section that renders it
and the run directories whose rows it is rendered from::

    <!-- specdef report: detection runs/informed-detection runs/informed-detection-smollm2 -->
    …generated markdown…
    <!-- specdef report: end -->

:func:`update_page` re-renders every block whose run directories all hold rows and leaves the
others as they are (a page never loses published tables because a run directory is absent, and
never mixes a partial rerun into a table). Sections are pure functions of the rows
(:data:`SECTIONS`); the prose around the blocks is the page's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from specdef.errors import SpecdefError, did_you_mean
from specdef.report.informed import detection_section, digits_section, smollm2_section
from specdef.report.markdown import Row
from specdef.report.native import native_section
from specdef.report.optimizers import ladder_section, lora_section, optimizer_grid_section
from specdef.report.table1 import curvature_section, table1_section
from specdef.utils.files import read_jsonl, write_text_atomic

SECTIONS: dict[str, Callable[[Sequence[Row]], str]] = {
    "detection": detection_section,
    "informed-digits": digits_section,
    "informed-smollm2": smollm2_section,
    "native-vs-algorithm1": native_section,
    "ladder": ladder_section,
    "lora-targets": lora_section,
    "optimizer-grid": optimizer_grid_section,
    "table1": table1_section,
    "defense-curvature": curvature_section,
}
END = "<!-- specdef report: end -->"
_BLOCK = re.compile(
    r"^<!-- specdef report: (?P<section>[\w-]+)(?P<dirs>(?: [^\s>]+)+) -->\n"
    r"(?P<body>.*?)^" + re.escape(END) + r"$",
    re.S | re.M,
)


@dataclass(frozen=True)
class PageUpdate:
    """What :func:`update_page` did: the blocks rendered, and those kept with the reason."""

    path: Path
    rendered: tuple[str, ...]
    kept: tuple[tuple[str, str], ...] = field(default=())


def render_block(section: str, rows: Sequence[Row]) -> str:
    """The markdown of one block (ends with a newline)."""
    if section not in SECTIONS:
        raise SpecdefError(did_you_mean(section, SECTIONS, what="report section"))
    text = SECTIONS[section](rows)
    return text if text.endswith("\n") else text + "\n"


def update_page(page: str | Path, *, root: str | Path = ".") -> PageUpdate:
    """Re-render the blocks of ``page`` from the rows in their run directories (relative to
    ``root``); write the page atomically if anything changed."""
    path = Path(page)
    if not path.is_file():
        raise SpecdefError(
            f"No page {str(path)!r}; give a markdown file with specdef report blocks."
        )
    text = path.read_text(encoding="utf-8")
    rendered: list[str] = []
    kept: list[tuple[str, str]] = []

    def replace(match: re.Match[str]) -> str:
        section, dirs = match["section"], match["dirs"].split()
        rows: list[Row] = []
        for run_dir in dirs:
            found = read_jsonl(Path(root) / run_dir / "results.jsonl")
            if not found:
                kept.append((section, f"no rows in {run_dir}"))
                return match[0]
            rows += found
        rendered.append(section)
        head = match[0][: match.start("body") - match.start()]
        return head + render_block(section, rows) + END

    new = _BLOCK.sub(replace, text)
    if not rendered and not kept:
        raise SpecdefError(
            f"{str(path)!r} has no specdef report block; mark one with "
            "'<!-- specdef report: SECTION RUN_DIR… -->' … '<!-- specdef report: end -->'."
        )
    if new != text:
        write_text_atomic(path, new)
    return PageUpdate(path, tuple(rendered), tuple(kept))
