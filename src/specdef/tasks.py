"""Tasks: what the attacker trains on and what is evaluated. A task owns its data splits, its loss
and its metrics, so the one attack loop works on classifiers and language models alike.

A *batch* is a ``dict[str, Tensor]``: ``{"x", "y"}`` for classification, ``{"input_ids",
"attention_mask", "labels"}`` (labels ``-100`` where no loss is taken) for causal language models.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from specdef.errors import SpecdefError

Batch = dict[str, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    """What the attack loop and the curvature tools need from a dataset."""

    name: str
    kind: str  # "classification" or "causal-lm"

    def train_batches(self, *, batch_size: int, seed: int) -> Iterator[Batch]:
        """An endless, seeded stream of training batches (reshuffled each epoch)."""
        ...

    def eval_splits(self) -> Mapping[str, Sequence[Batch]]:
        """Fixed held-out batches by split name (``"harmful"``, ``"benign"``, …)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean loss of ``model`` on ``batch`` (a scalar with a graph)."""
        ...

    def evaluate(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        """Metrics over ``batches``: always ``loss``; ``accuracy`` where the task has one."""
        ...


def _require_examples(name: str, count: int) -> None:
    if count == 0:
        raise SpecdefError(
            f"Task {name!r} has no training examples (e.g. max_length dropped every pair); "
            "raise max_length or choose another task."
        )


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class ClassificationTask:
    """Classification on tensors. ``train = (x, y)``; ``heldout[split] = (x, y)``."""

    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    heldout: dict[str, tuple[torch.Tensor, torch.Tensor]]
    eval_batch_size: int = 1024
    kind: str = field(default="classification", init=False)

    def train_batches(self, *, batch_size: int, seed: int) -> Iterator[Batch]:
        x, y = self.train
        _require_examples(self.name, len(y))
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(y), generator=gen)
            for sl in _chunks(len(y), batch_size):
                idx = order[sl]
                if len(idx) == batch_size or len(y) < batch_size:
                    yield {"x": x[idx], "y": y[idx]}

    def eval_splits(self) -> dict[str, list[Batch]]:
        return {
            split: [{"x": x[sl], "y": y[sl]} for sl in _chunks(len(y), self.eval_batch_size)]
            for split, (x, y) in self.heldout.items()
        }

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["x"])
        return F.cross_entropy(logits, batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        total, loss_sum, correct = 0, 0.0, 0
        for batch in batches:
            logits = model(batch["x"])
            loss_sum += float(F.cross_entropy(logits, batch["y"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["y"]).sum())
            total += len(batch["y"])
        return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}


def pad_examples(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> Batch:
    """Right-pad tokenized examples (``input_ids`` and ``labels``) into a batch."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class CausalLMTask:
    """Next-token loss on tokenized examples (``input_ids`` and ``labels`` with ``-100`` masked).

    ``train`` and ``heldout[split]`` are lists of examples; batches are right-padded.
    """

    name: str
    train: list[dict[str, list[int]]]
    heldout: dict[str, list[dict[str, list[int]]]]
    pad_id: int
    eval_batch_size: int = 8
    kind: str = field(default="causal-lm", init=False)

    def train_batches(self, *, batch_size: int, seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        n = len(self.train)
        _require_examples(self.name, n)
        while True:
            order = torch.randperm(n, generator=gen).tolist()
            for sl in _chunks(n, batch_size):
                idx = order[sl]
                if len(idx) == batch_size or n < batch_size:
                    yield pad_examples([self.train[i] for i in idx], self.pad_id)

    def eval_splits(self) -> dict[str, list[Batch]]:
        return {
            split: [
                pad_examples(ex[sl], self.pad_id) for sl in _chunks(len(ex), self.eval_batch_size)
            ]
            for split, ex in self.heldout.items()
        }

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return token_loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        loss_sum, tokens = 0.0, 0
        for batch in batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(token_loss(model, batch)) * n
            tokens += n
        mean = loss_sum / max(tokens, 1)
        return {"loss": mean, "perplexity": float(torch.tensor(mean).exp())}


def token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not ``-100``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits if hasattr(out, "logits") else out
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
    )


def _embedding_rows(model: nn.Module) -> int | None:
    """Rows of the token embedding of a language model, ``None`` for a model that takes features."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return int(embedding.num_embeddings) if isinstance(embedding, nn.Embedding) else None


def _max_token_id(task: CausalLMTask) -> int:
    examples = [*task.train, *(e for split in task.heldout.values() for e in split)]
    return max((max(e["input_ids"], default=0) for e in examples), default=0)


def check_compatible(model: nn.Module, task: Task, *, model_name: str = "the model") -> None:
    """Refuse a model that cannot train on ``task`` before any training starts: the input kind
    (token ids vs features), a vocabulary smaller than the task's token ids, then one probe
    forward of the loss on a single training batch (a shape mismatch fails there, in one line)."""
    rows = _embedding_rows(model)
    if task.kind == "classification" and rows is not None:
        raise SpecdefError(
            f"{model_name} is a language model (it takes token ids) but task {task.name!r} gives "
            "feature tensors; pick a classification model (e.g. mlp-digits) or a language task."
        )
    if task.kind == "causal-lm":
        if rows is None:
            raise SpecdefError(
                f"{model_name} takes feature tensors but task {task.name!r} gives token ids; pick "
                "a language model (e.g. llama-tiny-benign) or a classification task."
            )
        assert isinstance(task, CausalLMTask)
        top = _max_token_id(task)
        if top >= rows:
            raise SpecdefError(
                f"Task {task.name!r} has token id {top} but the vocabulary of {model_name} has "
                f"{rows} entries (its tokenizer does not belong to this model); use the model's "
                "own tokenizer or a model with a larger vocabulary."
            )
    training = model.training
    model.eval()  # the probe leaves no trace (no batch-norm statistics move)
    try:
        batch = next(task.train_batches(batch_size=1, seed=0))
        with torch.no_grad():
            task.loss(model, batch)
    except SpecdefError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise SpecdefError(
            f"{model_name} cannot run on task {task.name!r}'s inputs "
            f"({str(err).splitlines()[0][:160]}); pick a model and task of the same kind and shape."
        ) from None
    finally:
        model.train(training)
