"""Tensor-by-tensor safetensors I/O for :mod:`specdef.streaming.defend`: read one tensor through a
memory map opened for that read alone, and write a shard whose header is planned up front so that
only the tensor being written is ever in memory (the format: an 8-byte little-endian header length,
a JSON header of names, dtypes, shapes and byte offsets, then the raw little-endian data)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import nn

from specdef.errors import SpecdefError
from specdef.io.checkpoint import INDEX, WEIGHTS
from specdef.streaming import overlap
from specdef.utils.files import confined, write_json_atomic
from specdef.utils.progress import track

if TYPE_CHECKING:
    from specdef.streaming.resume import Staging

# safetensors header dtype codes (the on-disk names; user-facing names: specdef.utils.dtypes)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors checkpoint on disk, read tensor by tensor (never loaded as a model; the
    in-memory view is :class:`specdef.release.sources.Source`)."""

    root: Path
    files: tuple[str, ...]
    weight_map: dict[str, str]  # tensor name → file
    specs: dict[str, tuple[str, tuple[int, ...]]]  # tensor name → (dtype code, shape)


def _read_index(root: Path) -> dict[str, str]:
    """The shard index's ``weight_map`` (tensor → shard file), every file confined to ``root`` and
    a ``.safetensors`` file: a hostile index can neither read nor write outside the checkpoint."""
    where = f"{str(root / INDEX)!r}"
    try:
        index = json.loads((root / INDEX).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise SpecdefError(f"{where} is not valid JSON ({err}); repair or re-save it.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SpecdefError(f"{where} has no 'weight_map' object; repair or re-save it.")
    for name, fname in weight_map.items():
        target = confined(root, fname, what=f"{where} entry {name!r}")
        if target.parent != root.resolve() or not target.name.endswith(".safetensors"):
            raise SpecdefError(
                f"{where} entry {name!r} names {fname!r}; shards are .safetensors files directly "
                "in the checkpoint directory."
            )
    return {str(k): str(v) for k, v in weight_map.items()}


def open_checkpoint(src: str | os.PathLike[str]) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    root = Path(src)
    if not (root / "config.json").is_file():
        raise SpecdefError(
            f"Expected a Hugging Face checkpoint directory with config.json, found none at "
            f"{str(root)!r}; pass the folder written by save_pretrained."
        )
    if (root / INDEX).is_file():
        weight_map = _read_index(root)
        files = tuple(dict.fromkeys(weight_map.values()))
    elif (root / WEIGHTS).is_file():
        files, weight_map = (WEIGHTS,), {}
    else:
        raise SpecdefError(
            f"{str(root)!r} has neither {WEIGHTS} nor {INDEX}; streaming reads safetensors only "
            "(convert .bin checkpoints with save_pretrained(safe_serialization=True))."
        )
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for fname in files:
        if not (root / fname).is_file():
            raise SpecdefError(f"Shard {fname!r} listed in {INDEX} is missing from {str(root)!r}.")
        try:
            with safe_open(str(root / fname), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    view = handle.get_slice(name)
                    specs[name] = (view.get_dtype(), tuple(view.get_shape()))
                    weight_map[name] = fname
        except (SafetensorError, OSError) as err:
            raise SpecdefError(
                f"Shard {str(root / fname)!r} is truncated or corrupt ({err}); re-save it."
            ) from None
    return Checkpoint(root, files, weight_map, specs)


def check_shapes(source: Checkpoint, model: nn.Module) -> None:
    """Refuse a checkpoint whose safetensors headers disagree with the shapes its config.json
    implies (``model`` built from that config, e.g. on the meta device) — a transposed or lying
    header — before anything is read in full or written."""
    for name, tensor in model.state_dict().items():
        spec = source.specs.get(name)
        if spec is not None and tuple(spec[1]) != tuple(tensor.shape):
            raise SpecdefError(
                f"Tensor {name!r} has shape {list(spec[1])} in the header of "
                f"{str(source.root / source.weight_map[name])!r} but config.json implies "
                f"{list(tensor.shape)}; the checkpoint does not match its config — re-save it."
            )


def read_tensor(source: Checkpoint, name: str) -> torch.Tensor:
    """One tensor, through a memory map opened and closed for this read alone."""
    from safetensors import safe_open

    with safe_open(str(source.root / source.weight_map[name]), framework="pt") as handle:
        return handle.get_tensor(name)


def nbytes(code: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[code]).element_size()


class ShardWriter:
    """Writes a safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is
    known up front, so only the tensor being written is in memory. ``sha256`` and ``size`` describe
    the bytes written (hashed on the way out, so a resumed run can verify the file later)."""

    def __init__(
        self,
        path: Path,
        plan: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, code, shape in plan:
            size = nbytes(code, shape)
            header[name] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._order.append((name, code, shape, size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        self.data_bytes = offset
        self._handle: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._hash = hashlib.sha256()
        self.size = 0
        self._put(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _put(self, data: bytes | memoryview) -> None:
        self._handle.write(data)
        self._hash.update(data)
        self.size += memoryview(data).nbytes

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, code, shape, _ = self._order[self._next]
        if name != want or CODES[tensor.dtype] != code or tuple(tensor.shape) != shape:
            raise RuntimeError(f"shard writer expected {want} {code} {shape}, got {name}")
        self._put(tensor.detach().contiguous().view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"shard incomplete: {self._next} of {len(self._order)} tensors")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


Output = tuple[str, str, tuple[int, ...]]  # (name, dtype code, shape)


@dataclass
class Item:
    """Output tensors produced from one input tensor: ``produce(tensor)`` is given the input as read
    (None: copied unchanged)."""

    origin: str
    outputs: list[Output]
    produce: Any = None  # Callable[[torch.Tensor], dict[str, torch.Tensor]]


def write_shards(
    source: Checkpoint,
    staging: Staging,
    items: dict[str, Item],
    *,
    reports: list[dict[str, Any]],
    metadata: dict[str, str] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Write one output shard per input shard into ``staging.out``, tensor by tensor, plus the index
    when the input had one. ``items`` maps input names to replacements; the ``produce`` callables
    append what they learn to ``reports``. Shards finished by an earlier run (verified) are skipped
    and their reports read back from their records. Returns the number of output tensors and the
    reports in shard order. ``metadata``: every shard's safetensors header metadata.

    Three stages overlap (:mod:`specdef.streaming.overlap`): the next input tensor is read — across
    shard boundaries — while the current one is transformed, and the outputs are written, hashed,
    fsynced and recorded as finished on a background thread, in order. A shard counts as finished
    only once its file is fsynced and its record written, so a run killed at any point resumes."""
    weight_map: dict[str, str] = {}
    total = 0
    ordered: list[dict[str, Any]] = []
    done = {f: staging.finished(f) for f in source.files}  # verified records of an earlier run
    members = {
        f: [n for n, g in source.weight_map.items() if g == f] for f in source.files if not done[f]
    }
    todo = list(members)
    with (
        overlap.Prefetch(
            [n for f in todo for n in members[f]], functools.partial(read_tensor, source)
        ) as tensors,
        overlap.Background() as background,
    ):
        for fname in track(source.files, "defending shards", total=len(source.files)):
            record = done[fname]
            if record is None:
                record = _write_shard(
                    source, staging, fname, members[fname], items, tensors, background,
                    reports=reports, metadata=metadata,
                )  # fmt: skip
            weight_map.update(dict.fromkeys(record["tensors"], fname))
            total += int(record["data_bytes"])
            ordered += record["reports"]
        background.drain()
    if len(source.files) > 1 or (source.root / INDEX).exists():
        write_json_atomic(
            staging.out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    return len(weight_map), ordered


def _write_shard(
    source: Checkpoint,
    staging: Staging,
    fname: str,
    names: list[str],
    items: dict[str, Item],
    tensors: Iterator[tuple[str, torch.Tensor]],
    background: overlap.Background,
    *,
    reports: list[dict[str, Any]],
    metadata: dict[str, str] | None,
) -> dict[str, Any]:
    """One output shard: transform each input as it arrives from ``tensors``, hand the outputs, the
    fsync and the resume record to ``background``; returns the record."""
    plan = [items.get(n) or Item(n, [(n, *source.specs[n])]) for n in names]
    writer = ShardWriter(staging.out / fname, [o for item in plan for o in item.outputs], metadata)
    first = len(reports)
    for item in plan:
        name, tensor = next(tensors)
        if name != item.origin:  # pragma: no cover - the prefetch order is the plan's
            raise RuntimeError(f"prefetch order: expected {item.origin}, got {name}")
        produced = item.produce(tensor) if item.produce else {item.origin: tensor}
        del tensor
        for out_name, _, _ in item.outputs:
            background.submit(writer.write, out_name, produced.pop(out_name))
        del produced
    record = {
        "tensors": [o[0] for item in plan for o in item.outputs],
        "data_bytes": writer.data_bytes,
        "reports": reports[first:],
    }

    def finish() -> None:
        writer.close()
        staging.finish(fname, sha256=writer.sha256, size=writer.size, **record)

    background.submit(finish)
    return record
