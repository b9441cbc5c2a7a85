"""Provenance stamped on every manifest and result row: versions, git hash, host, time."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

_PACKAGES = (
    "specdef",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "numpy",
    "scipy",
    "pytorch_optimizer",
    "curvlinops-for-pytorch",
)


@functools.cache
def git_hash() -> str:
    """The commit of the specdef source tree (with ``+dirty`` when modified), or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@functools.cache
def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour determines results."""
    out: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def provenance() -> dict[str, Any]:
    """A dict to store beside any artefact: git hash, versions, python, platform, UTC time."""
    return {
        "git": git_hash(),
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def weights_digest(model: Any) -> str:
    """SHA-256 (16 hex digits) of a module's state: every tensor's name, dtype, shape and bytes in
    state-dict order. Equal digests mean the same weights; stamped into run ids so a resumed run
    never reuses rows made from other weights."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d buffers too
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]
