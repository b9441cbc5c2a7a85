"""What a release may carry from its source: an allowlist of known-safe metadata (configs,
tokenizer files, licence and notice text). Everything else — an undefended ``pytorch_model.bin``,
any other pickle, remote-code ``.py`` files, unknown binaries — stays behind, and the defend report
names it with the reason, so a release never ships a way around its own defense.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from specdef.io.hf import REMOTE_CODE_KEYS
from specdef.utils.files import write_json_atomic

# exact names a Hugging Face model directory holds besides its weights
SAFE_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",  # sentencepiece: a protobuf, no code
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
        "feature_extractor_config.json",
        "image_processor_config.json",
    }
)
# licence / notice text, any case, optional extension
SAFE_TEXT = re.compile(r"^(licen[cs]e|notice|copying|use_policy)(\.(md|txt))?$", re.I)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
CODE_SUFFIXES = (".py", ".pyc", ".so", ".sh", ".ipynb")
REMOTE_REASON = "remote-code reference (specdef never runs remote code), removed from the release"


@dataclass(frozen=True)
class Skipped:
    """A source file the release does not carry, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} — {self.reason}"


def _reason(path: Path) -> str | None:
    """``None`` when ``path`` may be copied into a release, else why not."""
    name = path.name
    if path.is_symlink():
        return "a symlink (never followed)"
    if not path.is_file():
        return "not a regular file"
    if name in SAFE_NAMES or SAFE_TEXT.match(name):
        return None
    lower = name.lower()
    if lower == "readme.md":
        return "the source's model card (the release gets its own, which says what was defended)"
    if lower.endswith(PICKLE_SUFFIXES):
        return "pickle (could hold undefended weights or run code when loaded)"
    if lower.endswith(CODE_SUFFIXES):
        return "code (specdef releases run no remote code)"
    if lower.endswith(".safetensors") or lower.endswith(".safetensors.index.json"):
        return "weights (rewritten by the defense, not copied)"
    return "not on the release allowlist"


def _remote_code_keys(path: Path) -> list[str]:
    """The remote-code entries (``auto_map``) of JSON file ``path``; [] when it has none or is not
    a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [key for key in REMOTE_CODE_KEYS if isinstance(data, dict) and key in data]


def release_files(source: str | Path) -> tuple[list[Path], list[Skipped]]:
    """The files of directory ``source`` a release copies, and what it leaves behind (files, and
    remote-code entries such as ``auto_map`` that :func:`strip_remote_code` removes)."""
    root = Path(source)
    copy: list[Path] = []
    skipped: list[Skipped] = []
    if not root.is_dir():
        return copy, skipped
    for path in sorted(root.iterdir()):
        reason = _reason(path)
        if reason is None:
            copy.append(path)
            if path.suffix == ".json":
                skipped += [Skipped(f"{path.name}: {key}", REMOTE_REASON)
                            for key in _remote_code_keys(path)]  # fmt: skip
        elif not reason.startswith("weights"):
            skipped.append(Skipped(path.name, reason))
    return copy, skipped


def strip_remote_code(directory: str | Path) -> None:
    """Remove remote-code entries (``auto_map``) from the JSON configs of a release being written
    (config.json, tokenizer_config.json, …), so no loader is pointed at code specdef did not ship;
    call it before the manifest binds config.json."""
    for path in sorted(Path(directory).glob("*.json")):
        if path.name not in SAFE_NAMES or not _remote_code_keys(path):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in REMOTE_CODE_KEYS:
            data.pop(key, None)
        write_json_atomic(path, data)
