"""Bring your own data: ``--data jsonl:PATH`` and ``--data dataset:PATH`` become tasks.

A record is one JSON object (a line of a JSONL file, or a row of a Hugging Face dataset saved with
``save_to_disk``), of one of three kinds, decided by the first record and required of all:

- ``{"prompt": str, "response": str}``: a chat exchange; language-model loss on the response only
  (the tokenizer's chat template, as for the zoo's ``harmful-qa``);
- ``{"text": str}``: plain text; loss on every token (truncated to ``max_length``);
- ``{"features": [...], "label": int}``: a labelled example for a classifier (``features`` a number
  list or nested lists of one fixed shape, e.g. ``[1, 8, 8]`` for a digits image).

The held-out split (the ``harmful`` split, which thresholds such as ``harmful_loss<=2`` read) is a
fixed, seeded 10 % of the records (at least one); a ``dataset:`` directory holding a ``DatasetDict``
with ``train`` and ``test`` (or ``validation``) splits keeps its own split. The attacker trains on the
rest: this data is what the attacker fine-tunes on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from specdef.errors import SpecdefError
from specdef.tasks import CausalLMTask, ClassificationTask
from specdef.zoo import images, text
from specdef.zoo.encoding import Example, encode_pairs

PREFIXES = ("jsonl:", "dataset:")
HELDOUT_FRACTION = 0.1
MAX_JSONL_BYTES = 2 * 1024**3  # a task is held in memory: refuse what cannot be
KINDS = {
    "qa": ("prompt", "response"),
    "text": ("text",),
    "labelled": ("features", "label"),
}


def is_user_data(name: str) -> bool:
    return name.startswith(PREFIXES)


def _kind(record: Mapping[str, Any], where: str) -> str:
    for kind, keys in KINDS.items():
        if all(k in record for k in keys):
            return kind
    raise SpecdefError(
        f"{where}: expected an object with prompt+response, text, or features+label, found keys "
        f"{sorted(record)[:6]}; see `specdef attack --help` for the record kinds."
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SpecdefError(
            f"--data jsonl:{path}: no such file; pass a JSONL file, one object a line."
        )
    if path.stat().st_size > MAX_JSONL_BYTES:
        raise SpecdefError(
            f"--data jsonl:{path}: {path.stat().st_size / 1024**3:.1f} GB is more than the "
            f"{MAX_JSONL_BYTES / 1024**3:.0f} GB a task may hold in memory; pass a subset."
        )
    records: list[dict[str, Any]] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SpecdefError(
                    f"{path}:{number}: not valid JSON ({str(err).splitlines()[0]}); one object a line."
                ) from None
            if not isinstance(record, dict):
                raise SpecdefError(
                    f"{path}:{number}: expected a JSON object, found {type(record).__name__}."
                )
            records.append(record)
    return records


def _read_dataset(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    if not path.is_dir():
        raise SpecdefError(
            f"--data dataset:{path}: no such directory; pass a folder written by a Hugging Face "
            "dataset's save_to_disk."
        )
    # datasets is heavy (pyarrow, pandas): imported only for this kind of source
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise SpecdefError(
            f"--data dataset:{path}: not a saved Hugging Face dataset ({str(err).splitlines()[0]})."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise SpecdefError(
                f"--data dataset:{path}: the DatasetDict has splits {sorted(loaded)} but no 'train'."
            )
        held = next((loaded[s] for s in ("test", "validation") if s in loaded), None)
        return loaded["train"].to_list(), held.to_list() if held is not None else None
    return loaded.to_list(), None


def _split(records: list[dict[str, Any]], seed: int) -> tuple[list[Any], list[Any]]:
    if len(records) < 2:
        raise SpecdefError(
            f"User data needs at least 2 records (one to train on, one held out), found "
            f"{len(records)}."
        )
    order = images.stable_order(len(records), seed)
    n_held = max(1, round(HELDOUT_FRACTION * len(records)))
    held, train = sorted(order[:n_held]), sorted(order[n_held:])
    return [records[i] for i in train], [records[i] for i in held]


def _string(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise SpecdefError(f"{where}: {key!r} must be a string, found {type(value).__name__}.")
    return value


def _lm_examples(
    records: Sequence[Mapping[str, Any]], kind: str, tokenizer: Any, max_length: int, what: str
) -> list[Example]:
    if kind == "qa":
        pairs = [
            text.Pair(_string(r, "prompt", f"{what} #{i}"), _string(r, "response", f"{what} #{i}"))
            for i, r in enumerate(records)
        ]
        return encode_pairs(tokenizer, pairs, max_length, what)
    out: list[Example] = []
    for i, record in enumerate(records):
        ids = tokenizer(_string(record, "text", f"{what} #{i}"), add_special_tokens=False)
        ids = list(ids["input_ids"])[:max_length]
        if len(ids) >= 2:
            out.append({"input_ids": ids, "labels": list(ids)})
    return out


def _tensor(records: Sequence[Mapping[str, Any]], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    shape: tuple[int, ...] | None = None
    for i, record in enumerate(records):
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise SpecdefError(f"{what} #{i}: 'label' must be an integer ≥ 0, found {label!r}.")
        try:
            x = torch.tensor(record.get("features"), dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise SpecdefError(
                f"{what} #{i}: 'features' must be numbers or nested lists of one shape ({err})."
            ) from None
        if shape is None:
            shape = tuple(x.shape)
        if tuple(x.shape) != shape or x.numel() == 0:
            raise SpecdefError(
                f"{what} #{i}: 'features' has shape {tuple(x.shape)}, expected {shape} like the "
                "first record."
            )
        if not bool(torch.isfinite(x).all()):
            raise SpecdefError(f"{what} #{i}: 'features' contains NaN or Inf.")
        feats.append(x)
        labels.append(label)
    return torch.stack(feats), torch.tensor(labels, dtype=torch.long)


def load_user_task(
    spec: str,
    *,
    tokenizer: Any = None,
    max_length: int = 256,
    seed: int = 0,
    eval_limit: int | None = None,
) -> CausalLMTask | ClassificationTask:
    """The task of ``spec`` (``jsonl:PATH`` or ``dataset:PATH``); language records need the model's
    ``tokenizer``. Raises :class:`SpecdefError` (one line) for any malformed record."""
    prefix, _, raw = spec.partition(":")
    if not raw:
        raise SpecdefError(f"--data {spec}: expected {prefix}:PATH.")
    path = Path(raw).expanduser()
    if prefix == "jsonl":
        records, held = _read_jsonl(path), None
    else:
        records, held = _read_dataset(path)
    if not records:
        raise SpecdefError(f"--data {spec}: no records.")
    kind = _kind(records[0], f"{spec} record #0")
    for i, record in enumerate([*records, *(held or [])]):
        if _kind(record, f"{spec} record #{i}") != kind:
            raise SpecdefError(
                f"{spec} record #{i}: a {_kind(record, '')} record among {kind} records."
            )
    train, heldout = (records, held) if held else _split(records, seed)
    if eval_limit is not None:
        heldout = heldout[:eval_limit]
    if kind == "labelled":
        x, y = _tensor([*train, *heldout], spec)  # one shape for every record, train and held out
        n = len(train)
        return ClassificationTask(
            name=spec, train=(x[:n], y[:n]), heldout={"harmful": (x[n:], y[n:])}
        )
    if tokenizer is None:
        raise SpecdefError(
            f"--data {spec} holds text, but the model has no tokenizer; pass a model directory "
            "with its tokenizer files."
        )
    if max_length < 8:
        raise SpecdefError(f"max_length must be at least 8 tokens, found {max_length}.")
    train_ex = _lm_examples(train, kind, tokenizer, max_length, spec)
    held_ex = _lm_examples(heldout, kind, tokenizer, max_length, spec)
    if not train_ex or not held_ex:
        raise SpecdefError(
            f"{spec}: nothing left to train on or evaluate after tokenizing to max_length="
            f"{max_length}; raise --max-length or pass longer records."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return CausalLMTask(
        name=spec, train=train_ex, heldout={"harmful": held_ex}, pad_id=int(pad or 0)
    )
