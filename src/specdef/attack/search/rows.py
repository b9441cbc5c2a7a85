"""The results file of a search shared by processes (rows survive a writer killed mid-line) and
the best trial per optimizer, a pure function of the rows."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Complete rows of ``path``; lines cut short by a killed writer are skipped, even where
    another process appended after them."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a partial line in %s (a killed writer)", path)
    return rows


def append_row(path: Path, row: Mapping[str, Any]) -> None:
    """Append one row with one ``write`` + fsync; a partial last line left by a killed writer is
    closed first, so the new row starts on a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, default=str, allow_nan=True) + "\n"
    with open(path, "ab") as handle:
        if handle.tell() > 0:
            with open(path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    line = "\n" + line
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def best_trials(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Per optimizer, the completed trial with the smallest objective (ties: lower trial number);
    ``None`` where no trial completed. A pure function of search rows."""
    best: dict[str, dict[str, Any] | None] = {}
    for row in rows:
        opt = str(row["optimizer"])
        best.setdefault(opt, None)
        if row.get("trial_state") != "complete":
            continue
        current = best[opt]
        key = (float(row["objective"]), int(row["trial"]))
        if current is None or key < (float(current["objective"]), int(current["trial"])):
            best[opt] = dict(row)
    return best
