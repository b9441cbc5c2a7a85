"""Atomic file and directory writes: a crash never leaves a half-written artefact behind."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from specdef.errors import SpecdefError


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in 16 MB blocks (shard records, manifest integrity)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * 1024**2):
            hasher.update(chunk)
    return hasher.hexdigest()


@contextlib.contextmanager
def locked(lock_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the ``with`` block;
    the kernel releases it if the process dies."""
    path = Path(lock_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append one JSON row and fsync. A row is written with a single ``write`` call of a whole line,
    so a killed process leaves at most one truncated last line, which :func:`read_jsonl` skips."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, default=str, allow_nan=True) + "\n"
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read all complete rows of a JSONL file; a truncated final line (from a kill) is ignored."""
    target = Path(path)
    if not target.exists():
        return []
    rows: list[dict[str, Any]] = []
    with open(target, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # a write cut short by a kill: not a finished row
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def check_output_target(target: Path, *, overwrite: bool) -> Path:
    """Refuse an existing ``target`` unless ``overwrite``; create its parent and check that it is
    writable, before any work starts. Returns the parent."""
    if target.exists() and not overwrite:
        raise SpecdefError(
            f"Output path {str(target)!r} already exists; choose another path or pass --overwrite."
        )
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecdefError(
            f"Cannot create output folder {str(parent)!r}: {err.strerror}; choose a writable path."
        ) from None
    if not os.access(parent, os.W_OK):
        raise SpecdefError(
            f"Output folder {str(parent)!r} is not writable; choose a writable path with -o."
        )
    return parent


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``path``.

    Refuses an existing ``path`` unless ``overwrite``; checks that the parent is writable before any
    work starts. On failure the temporary directory is removed and ``path`` is untouched.
    """
    target = Path(path)
    parent = check_output_target(target, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_markdown_section(path: str | os.PathLike[str], heading: str, text: str) -> None:
    """Atomically put ``text`` (which starts with the ``## heading`` line) in place of that section
    of a Markdown file — from the heading to the next ``## `` heading — or append it. Benchmarks
    sharing one page each rewrite only their own section this way."""
    target = Path(path)
    old = target.read_text(encoding="utf-8") if target.exists() else "# Benchmarks\n"
    block = text.rstrip("\n") + "\n"
    if heading in old:
        start = old.index(heading)
        nxt = old.find("\n## ", start + len(heading))
        new = old[:start] + block + ("\n" + old[nxt + 1 :] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    write_text_atomic(target, new)


def replace_marked_region(path: str | os.PathLike[str], start: str, end: str, text: str) -> None:
    """Atomically replace what lies between the ``start`` and ``end`` marker lines of a file (the
    markers stay), so a script regenerates its table inside a hand-written page."""
    target = Path(path)
    old = target.read_text(encoding="utf-8")
    if start not in old or end not in old:
        raise SpecdefError(
            f"{str(target)!r} lacks the markers {start!r} … {end!r}; add them where the "
            "generated text belongs."
        )
    head, rest = old.split(start, 1)
    write_text_atomic(target, head + start + text + end + rest.split(end, 1)[1])


def preflight_output(path: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Fail fast (before any heavy work) when ``path`` exists or its folder is not writable."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise SpecdefError(
            f"Output path {str(target)!r} already exists; choose another path or pass --overwrite."
        )
    parent = target.parent if str(target.parent) else Path(".")
    probe_dir = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe_dir = tempfile.mkdtemp(prefix=".specdef-write-test.", dir=parent)
    except OSError as err:
        raise SpecdefError(
            f"Output folder {str(parent)!r} is not writable ({err.strerror}); choose a writable "
            "path with -o."
        ) from None
    finally:
        if probe_dir is not None:
            shutil.rmtree(probe_dir, ignore_errors=True)


def confined(root: str | os.PathLike[str], relative: object, *, what: str) -> Path:
    """``root / relative`` for a path read from a file (a shard index, a manifest), refused unless it
    is a plain relative path that stays inside ``root`` after resolving symlinks."""
    base = Path(root).resolve()
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise SpecdefError(
            f"{what}: expected a file name inside {str(base)!r}, found {relative!r}."
        )
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts or relative.startswith("~"):
        raise SpecdefError(
            f"{what}: {relative!r} leaves {str(base)!r} (absolute or '..' path); a checkpoint names "
            "only files inside its own directory."
        )
    target = (base / candidate).resolve()
    if target != base and base not in target.parents:
        raise SpecdefError(
            f"{what}: {relative!r} resolves outside {str(base)!r} (a symlink); refusing to follow it."
        )
    return target
