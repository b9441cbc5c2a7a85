"""A content-checked, concurrency-safe cache of prepared assets (converted models, trained weights).

Each entry is a directory ``<root>/<kind>/<key>/`` built in a temporary sibling and renamed into
place, with ``manifest.json`` written *last* inside the temporary directory. The manifest lists the
size and SHA-256 of every other file, so an entry is used only when

- the directory and its manifest exist (a build that was killed never renamed its directory), and
- every listed file exists with the recorded size (a truncated or deleted file is caught cheaply);
  when a file's modification time differs from the recorded one, its SHA-256 is checked too, so an
  in-place edit is caught without hashing 500 MB on every load.

Anything else is treated as absent: the entry is removed and rebuilt. Builders run under an
exclusive ``fcntl`` lock on ``<root>/.locks/<kind>-<key>.lock``, so two processes (e.g. two
pytest-xdist workers) preparing the same entry build it once; the second waits and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specdef.errors import SpecdefError
from specdef.utils.files import locked, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_FORMAT = 1


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$SPECDEF_CACHE``, else
    ``$XDG_CACHE_HOME/specdef``, else ``~/.cache/specdef``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SPECDEF_CACHE"):
        return Path(os.environ["SPECDEF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "specdef"


def sha256_file(path: Path, *, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able recipe (sorted keys): the cache key's suffix."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def entry_dir(kind: str, key: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return cache_root(cache_dir) / kind / key


def read_manifest(path: Path, *, verify: bool = False) -> dict[str, Any] | None:
    """The manifest of a *valid* entry at ``path``, or ``None`` when it is absent or damaged.
    ``verify`` checks every file's SHA-256 even when its size and modification time match."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.get("format") != _FORMAT:
        return None
    for name, info in files.items():
        file = path / name
        try:
            stat = file.stat()
        except OSError:
            log.warning("cache entry %s: %s is missing", path, name)
            return None
        if stat.st_size != info["size"]:
            log.warning(
                "cache entry %s: %s has %d bytes, expected %d",
                path,
                name,
                stat.st_size,
                info["size"],
            )
            return None
        if (verify or stat.st_mtime_ns != info["mtime_ns"]) and sha256_file(file) != info["sha256"]:
            log.warning("cache entry %s: %s does not match its SHA-256", path, name)
            return None
    return manifest


def _remove(path: Path) -> None:
    """Move a damaged entry aside (an atomic rename), then delete it."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash.", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def ensure_entry(
    kind: str,
    key: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    verify: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Return ``(path, manifest)`` of a valid entry, building it first when needed.

    ``build(tmp_dir)`` writes the entry's files into ``tmp_dir`` and returns metadata stored in the
    manifest under ``"meta"``. The manifest (sizes and SHA-256 of every file) is written last, then
    the directory is renamed into place. ``verify`` hashes every file of an existing entry.
    """
    path = entry_dir(kind, key, cache_dir=cache_dir)
    manifest = read_manifest(path, verify=verify)
    if manifest is not None:
        return path, manifest
    root = cache_root(cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecdefError(
            f"Cannot create the specdef cache {str(root)!r}: {err.strerror}; set SPECDEF_CACHE to a "
            "writable folder."
        ) from None
    with locked(root / ".locks" / f"{kind}-{key}.lock"):
        manifest = read_manifest(
            path, verify=verify
        )  # another process may have built it while we waited
        if manifest is not None:
            return path, manifest
        if path.exists():
            log.warning("cache entry %s is incomplete or damaged; rebuilding it", path)
            _remove(path)
        for stale in path.parent.glob(
            f".{key}.*.tmp"
        ):  # left by a killed builder (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent))
        try:
            meta = build(tmp)
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                stat = file.stat()
                files[file.relative_to(tmp).as_posix()] = {
                    "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns,
                    "sha256": sha256_file(file),
                }
            manifest = {"format": _FORMAT, "kind": kind, "key": key, "files": files, "meta": meta}
            write_json_atomic(tmp / MANIFEST, manifest)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("prepared cache entry %s", path)
    return path, manifest
