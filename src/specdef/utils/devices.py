"""Which device a command runs its model on: ``--device auto|cpu|cuda[:N]|mps`` parsed once
(:func:`resolve_device`), with one-line errors for a device this machine does not have, and the
dtype rules per device (:func:`check_dtype`)."""

from __future__ import annotations

import re
from typing import Any

import torch

from specdef.errors import SpecdefError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``name`` stands for: ``auto`` (or None) is CUDA device 0 when CUDA is
    available, else CPU (MPS is never picked automatically: it has no float64, which specdef's
    guard and float64 studies use — ask for it with ``mps``). Raises :class:`SpecdefError` for an
    unknown name, or a CUDA/MPS device this machine does not have."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if not _PATTERN.fullmatch(text):
        raise SpecdefError(f"Unknown device {name!r}; expected {DEVICE_CHOICES}.")
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecdefError(
                f"--device {text}: CUDA is not available on this machine (torch "
                f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); "
                "use --device cpu or auto."
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise SpecdefError(
                f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})."
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise SpecdefError(f"--device {text}: MPS (Apple GPU) is not available on this machine.")
    return device


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a dtype the device cannot run: MPS has no float64."""
    if device.type == "mps" and dtype == torch.float64:
        raise SpecdefError(
            "MPS has no float64; pass --dtype float32 (or bfloat16), or run on --device cpu."
        )


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a mapping / tuple / list of them, nested) on ``device``; anything
    else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
