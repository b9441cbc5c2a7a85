"""What the defenses read off a model, for classifiers and causal LMs alike: logits (optionally at
other parameter values, for TAR's inner attack), the task loss from logits, per-example
log-likelihoods (NPO), hidden representations by module name (RMU, RepNoise, immunization) and the
default layers to read them at.

Batches are the tasks' (:mod:`specdef.tasks`): ``{"x", "y"}`` or ``{"input_ids",
"attention_mask", "labels"}`` with ``-100`` where no loss is taken.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from specdef.errors import SpecdefError, did_you_mean
from specdef.tasks import Batch


def is_lm_batch(batch: Batch) -> bool:
    return "input_ids" in batch


def logits(
    model: nn.Module, batch: Batch, params: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The model's logits on ``batch``: (B, C) for a classifier, (B, T, V) for an LM; with
    ``params``, evaluated at those parameter values (``torch.func.functional_call``)."""
    if is_lm_batch(batch):
        args: tuple[torch.Tensor, ...] = ()
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    else:
        args, kwargs = (batch["x"],), {}
    out = (
        model(*args, **kwargs)
        if params is None
        else torch.func.functional_call(model, dict(params), args, kwargs)
    )
    return out.logits if hasattr(out, "logits") else out


def loss_from_logits(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The task's mean loss: cross-entropy on labels, next-token cross-entropy on LM labels."""
    if not is_lm_batch(batch):
        return F.cross_entropy(out, batch["y"])
    shifted = out[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
    )


def retain_loss(model: nn.Module, retain: Batch, weight: float) -> torch.Tensor:
    """``weight`` × the task loss on the retain batch (a zero without a forward pass at 0)."""
    if not weight:
        return torch.zeros(())
    return weight * loss_from_logits(logits(model, retain), retain)


def log_likelihood(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-example log π(y | x), shape (B,): the label's log-probability (classifier) or the sum
    of the answer tokens' log-probabilities (LM, positions whose label is not ``-100``)."""
    if not is_lm_batch(batch):
        return out.log_softmax(-1).gather(-1, batch["y"][:, None])[:, 0]
    labels = batch["labels"][:, 1:]
    logp = out[:, :-1].float().log_softmax(-1)
    mask = labels != -100
    taken = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (taken * mask).sum(-1)


def prediction_entropy(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean entropy of the predicted distribution (over examples, or over answer tokens)."""
    if not is_lm_batch(batch):
        logp = out.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1).mean()
    logp = out[:, :-1].float().log_softmax(-1)
    mask = (batch["labels"][:, 1:] != -100).float()
    entropy = -(logp.exp() * logp).sum(-1)
    return (entropy * mask).sum() / mask.sum().clamp(min=1.0)


def token_mask(batch: Batch) -> torch.Tensor | None:
    """Which positions of a representation count: the attention mask (LM), None (classifier)."""
    return batch["attention_mask"].bool() if is_lm_batch(batch) else None


def rows(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Representations as (N, d) rows: one per example, or one per unmasked token."""
    if mask is None:
        return hidden.reshape(hidden.shape[0], -1)
    return hidden[mask]


def default_layers(model: nn.Module) -> list[str]:
    """The hidden representations a representation defense reads, in forward order: each decoder
    layer's output (``model.layers.i`` of a Hugging Face LM) or each activation module's output
    (an :class:`specdef.architectures.MLP`'s ``layers.1``, ``layers.3`` …)."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(blocks, nn.ModuleList):
        return [f"model.layers.{i}" for i in range(len(blocks))]
    names = [
        name
        for name, module in model.named_modules()
        if name and not list(module.children()) and not list(module.parameters(recurse=False))
    ]
    if not names:
        raise SpecdefError(
            f"Cannot find hidden representations in a {type(model).__name__}; name the layers "
            "(e.g. layer=layers.3)."
        )
    return names


def probe_layer(model: nn.Module) -> str:
    """The name of the model's last ``nn.Linear``: the linear probe on top of its features."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise SpecdefError(f"A {type(model).__name__} has no nn.Linear to read features at.")
    return names[-1]


def check_layers(model: nn.Module, names: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise SpecdefError(did_you_mean(name, [n for n in modules if n], what="layer"))


@contextlib.contextmanager
def capture(
    model: nn.Module, names: Sequence[str], *, inputs: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores the output (or with ``inputs``, the first
    input) of each module in ``names`` under its name (a decoder layer's tuple output: its first
    element, the hidden states). The tensors keep their graph."""
    check_layers(model, names)
    store: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in names:

        def keep(
            _m: nn.Module, args: tuple[object, ...], out: object = None, *, _n: str = name
        ) -> None:
            value = args[0] if inputs else out
            if isinstance(value, tuple):
                value = value[0]
            if isinstance(value, torch.Tensor):
                store[_n] = value

        if inputs:
            handles.append(modules[name].register_forward_pre_hook(keep))
        else:
            handles.append(modules[name].register_forward_hook(keep))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def representations(
    model: nn.Module, batch: Batch, names: Sequence[str], *, inputs: bool = False
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``batch`` and return each named module's representation as (N, d) rows."""
    with capture(model, names, inputs=inputs) as store:
        logits(model, batch)
    missing = [n for n in names if n not in store]
    if missing:
        raise SpecdefError(f"Layers {missing} produced no tensor in the forward pass.")
    return {name: rows(store[name], token_mask(batch)) for name in names}
