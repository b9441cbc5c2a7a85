"""User-facing errors: one line that says what was expected, what was found and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpecdefError(ValueError):
    """An error caused by user input. The CLI prints ``str(err)`` and exits with code 2."""


def did_you_mean(name: str, choices: Iterable[str], *, what: str = "name") -> str:
    """Format "Unknown <what> 'x'. Did you mean: y? Available: a, b, c" for an unknown ``name``."""
    options = sorted(set(choices))
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    shown = ", ".join(options[:40]) + (f", … ({len(options)} in all)" if len(options) > 40 else "")
    return f"Unknown {what} {name!r}.{hint} Available: {shown}"
