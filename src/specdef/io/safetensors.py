"""Reading a checkpoint for :mod:`specdef.informed.detect`: its safetensors files (one file, a directory,
or a sharded directory with its index), every 2-D floating tensor in them and their header
metadata, without reading a manifest or running any code. Public through :mod:`specdef.informed.detect`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specdef.errors import SpecdefError
from specdef.utils.files import confined


def safetensors_files(path: str | Path) -> list[Path]:
    """The ``*.safetensors`` files of ``path`` (a file, or a directory; the shards its index names)."""
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(root.glob("*.safetensors"))
    else:
        raise SpecdefError(
            f"Expected a checkpoint directory or .safetensors file, found nothing at {str(root)!r}; "
            "pass the folder that holds model.safetensors."
        )
    if not files:
        raise SpecdefError(
            f"Expected *.safetensors files in {str(root)!r}, found none; "
            "pass a folder saved with save_pretrained or specdef defend."
        )
    if root.is_dir() and (root / "model.safetensors.index.json").exists():
        where = f"{str(root / 'model.safetensors.index.json')!r}"
        try:
            index = json.loads((root / "model.safetensors.index.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise SpecdefError(f"{where} is not valid JSON ({err}); repair it.") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise SpecdefError(f"{where} has no 'weight_map' object; repair it.")
        files = sorted({confined(root, f, what=f"{where} entry") for f in weight_map.values()})
    return files


def checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All 2-D floating tensors of a safetensors checkpoint (file or directory, sharded or not),
    keyed by tensor name without a trailing ``.weight``. Reads no manifest and runs no code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise _unreadable(file, err) from None
        for key, t in tensors.items():
            if t.ndim == 2 and t.is_floating_point():
                if not bool(torch.isfinite(t).all()):
                    raise SpecdefError(
                        f"Tensor {key!r} in {str(file)!r} contains NaN or Inf entries; its "
                        "spectrum is undefined — repair the checkpoint first."
                    )
                out[key.removesuffix(".weight")] = t
    return out


def header_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a checkpoint's safetensors headers (every file's, merged; the
    first file wins on a clash), read without loading a tensor. Reads no manifest."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, str] = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise _unreadable(file, err) from None
        for key, value in meta.items():
            out.setdefault(key, value)
    return out


def _unreadable(file: Path, err: Exception) -> SpecdefError:
    return SpecdefError(
        f"Cannot read {str(file)!r} as safetensors ({err}); the file is missing or truncated — "
        "re-save the checkpoint."
    )
