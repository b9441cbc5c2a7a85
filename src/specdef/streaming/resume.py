"""Resumable output for :mod:`specdef.streaming.defend`: a staging directory next to OUT that survives a
kill, so rerunning the same command continues where the last run stopped.

Layout of ``<parent>/.<OUT name>.partial/``:

- ``state.json``: the run's options (mode, defense config, source files with size and mtime) —
  a rerun with other options is refused, or starts over with ``overwrite``;
- ``out/``: the directory that becomes OUT (shards, index, manifest, copied files);
- ``done/<shard>.json``: written (atomically, after the shard is fsynced) when a shard is finished:
  its sha256 and size, the tensors it holds and what the run learnt while writing it (layer
  reports). A shard without a record, or whose bytes no longer match it, is written again;
- ``plan.json`` + ``plan.safetensors`` (native mode): the pair transforms of the planning pass;
- ``lock``: ``flock``-ed while a run writes here (released by the kernel if the process dies).

Randomized top-k draws from a generator seeded per layer or pair
(:func:`specdef.defense.step.layer_seed`, the rule in-memory defense uses too), not from one shared
stream, so a resumed run writes the same bytes as an uninterrupted one. The finished OUT is
published by renames: OUT (if replaced) → ``replaced``, ``out`` → OUT, then the staging dir goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from specdef.errors import SpecdefError, WriteError
from specdef.utils.files import check_output_target, file_sha256, write_json_atomic, writing

log = logging.getLogger(__name__)

FORMAT = "specdef-streaming-partial"
VERSION = 1
STATE = "state.json"
PLAN = "plan"


def staging_path(out: str | os.PathLike[str]) -> Path:
    """Where a streaming run into ``out`` keeps its resumable state."""
    target = Path(out)
    return target.parent / f".{target.name}.partial"


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in dict.fromkeys([*old, *new]):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} → {new!r}"]


class Staging:
    """The staging directory of one run (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.out = root / "out"
        self.resumed: list[str] = []  # shards found finished and verified

    def _record_path(self, fname: str) -> Path:
        return self.root / "done" / f"{fname}.json"

    def finished(self, fname: str) -> dict[str, Any] | None:
        """The record of ``fname`` if that shard was finished by an earlier run and its bytes still
        match (size and sha256); otherwise None, after removing what is left of it."""
        record_path, shard = self._record_path(fname), self.out / fname
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            shard.unlink(missing_ok=True)
            return None
        size = shard.stat().st_size if shard.is_file() else -1
        if size != record.get("size") or file_sha256(shard) != record.get("sha256"):
            log.warning(
                "shard %s: finished earlier but its bytes no longer match the record "
                "(size %d, expected %s); writing it again",
                fname,
                size,
                record.get("size"),
            )
            record_path.unlink(missing_ok=True)
            shard.unlink(missing_ok=True)
            return None
        log.info("shard %s: finished earlier, sha256 verified; skipped", fname)
        self.resumed.append(fname)
        return dict(record)

    def finish(self, fname: str, *, sha256: str, size: int, **extra: Any) -> None:
        """Record ``fname`` (already closed and fsynced under ``out/``) as finished."""
        write_json_atomic(
            self._record_path(fname), {"file": fname, "sha256": sha256, "size": size, **extra}
        )
        log.info("shard %s: finished (%d bytes)", fname, size)

    def digests(self) -> dict[str, str]:
        """The sha256 of every shard recorded finished (hashed as it was written, or verified on
        resuming), by file name."""
        out = {}
        for path in sorted((self.root / "done").glob("*.json")):
            record = json.loads(path.read_text())
            out[str(record["file"])] = str(record["sha256"])
        return out

    def load_plan(self) -> tuple[dict[str, Any], Path] | None:
        """A verified native plan: ``(record, safetensors path)``, or None."""
        record_path, tensors = self.plan_paths()
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return None
        if tensors.is_file() and file_sha256(tensors) == record.get("sha256"):
            log.info("native plan: computed earlier, sha256 verified; reused")
            return record, tensors
        log.warning("native plan: its bytes no longer match the record; planning again")
        record_path.unlink(missing_ok=True)
        return None

    def plan_paths(self) -> tuple[Path, Path]:
        return self.root / f"{PLAN}.json", self.root / f"{PLAN}.safetensors"

    def publish(self, target: Path) -> None:
        replaced = self.root / "replaced"
        if target.exists() or target.is_symlink():
            os.replace(target, replaced)
        os.replace(self.out, target)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(
    out: str | os.PathLike[str], options: dict[str, Any], *, overwrite: bool = False
) -> Iterator[Staging]:
    """Yield the :class:`Staging` for ``out``: resumed when an earlier run with the same
    ``options`` (JSON data) was killed, fresh otherwise; OUT is published when the block ends.

    A leftover run with other options is refused, or discarded when ``overwrite``. A
    :class:`SpecdefError` in the block (a user error that would recur on rerun) removes the staging
    dir; any other failure — an interrupt, a full disk — keeps it for the next run.
    """
    target = Path(out)
    check_output_target(target, overwrite=overwrite)
    options = json.loads(json.dumps({"format": FORMAT, "version": VERSION, **options}))
    root = staging_path(target)
    root.mkdir(exist_ok=True)
    lock = open(root / "lock", "w")  # noqa: SIM115 - held for the whole run, closed below
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecdefError(
                f"Another specdef run is writing {str(target)!r} (lock held on {str(root)!r}); "
                "wait for it to finish or choose another -o."
            ) from None
        try:
            with writing(target):
                _prepare(root, options, overwrite)  # its own refusals keep the leftover run
        except WriteError as err:
            raise _kept(err, root) from None
        staging = Staging(root)
        try:
            with writing(target):
                yield staging
                staging.publish(target)
        except WriteError as err:  # a full disk recurs only until space is freed: keep the work
            raise _kept(err, root) from None
        except SpecdefError:
            shutil.rmtree(root, ignore_errors=True)
            raise
        except BaseException:
            log.warning("partial run kept in %s; rerun the same command to resume", root)
            raise
    finally:
        lock.close()


def _kept(err: WriteError, root: Path) -> WriteError:
    return WriteError(
        f"{err} The partial run is kept in {str(root)!r}: rerun the same command to resume it."
    )


def _prepare(root: Path, options: dict[str, Any], overwrite: bool) -> None:
    try:
        state = json.loads((root / STATE).read_text())
    except (OSError, ValueError):
        state = None
    if state is not None and state != options:
        diff = _differences(state, options)
        if not overwrite:
            more = f" (+{len(diff) - 2} more)" if len(diff) > 2 else ""
            raise SpecdefError(
                f"{str(root)!r} holds a partial run with other options ({'; '.join(diff[:2])}"
                f"{more}); rerun with the same options to resume it, or pass --overwrite to "
                "discard it and start over."
            )
        log.warning("discarding the partial run in %s (other options: %s)", root, "; ".join(diff))
        state = None
    if state is None:
        for item in root.iterdir():
            if item.name != "lock":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        write_json_atomic(root / STATE, options)
    (root / "out").mkdir(exist_ok=True)
    (root / "done").mkdir(exist_ok=True)
