"""User-facing errors: one line that says what was expected, what was found and how to fix it."""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable


class SpecdefError(ValueError):
    """An error caused by user input. The CLI prints ``str(err)`` and exits with code 2."""


class WriteError(SpecdefError):
    """Writing a file failed (no space, file too large, no permission, read-only file system). The
    message names the path; whatever was half written has been removed (a streaming staging dir is
    kept, since a rerun resumes it)."""


WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT}
)


def write_error(err: OSError, path: object) -> WriteError:
    """The one-line :class:`WriteError` for ``err`` raised while writing ``path`` (or, when the
    error names another file — say an unreadable input — that file)."""
    what = err.strerror or type(err).__name__
    code = errno.errorcode.get(err.errno or 0, "")
    named = str(err.filename) if err.filename else str(path)
    inside = os.path.abspath(named).startswith(os.path.dirname(os.path.abspath(str(path))))
    verb = "write" if inside else "access"
    return WriteError(
        f"Cannot {verb} {named!r}: {what}{f' ({code})' if code else ''}; nothing was left half "
        "written — free space, fix the permissions or choose another output path."
    )


def did_you_mean(name: str, choices: Iterable[str], *, what: str = "name") -> str:
    """Format "Unknown <what> 'x'. Did you mean: y? Available: a, b, c" for an unknown ``name``."""
    options = sorted(set(choices))
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    shown = ", ".join(options[:40]) + (f", … ({len(options)} in all)" if len(options) > 40 else "")
    return f"Unknown {what} {name!r}.{hint} Available: {shown}"
