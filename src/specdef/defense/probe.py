"""Running a model on a probe batch: its output tensor, the inputs and outputs of chosen layers (one
forward: :func:`capture`), and relative gaps. Used by the precision guard
(:mod:`specdef.defense.apply`) and ``specdef verify``.

A probe batch is a tensor (passed positionally) or a mapping (passed as keyword arguments, e.g.
``{"input_ids": ..., "attention_mask": ...}``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Probe = torch.Tensor | Mapping[str, torch.Tensor]


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output: ``logits``, else ``last_hidden_state``, else the first
    element of a tuple, else the output itself."""
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, tuple | list):
        return output_tensor(out[0])
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"Cannot find an output tensor in {type(out).__name__}.")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate deterministically (dropout off), restoring the caller's train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def model_output(model: nn.Module, probe: Probe) -> torch.Tensor:
    """``model`` applied to ``probe`` (no grad, eval mode); the main output tensor."""
    with eval_mode(model):
        if isinstance(probe, Mapping):
            return output_tensor(model(**probe))
        return output_tensor(model(probe))


@dataclass(frozen=True)
class Capture:
    """What one forward of a model on a probe batch showed: ``output`` (the main output tensor) and,
    for each named module, the ``inputs`` it received and the ``outputs`` it returned on its first
    call (copies, so a later in-place operation of the model cannot change them)."""

    output: torch.Tensor
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@torch.no_grad()
def capture(model: nn.Module, names: Sequence[str], probe: Probe) -> Capture:
    """Run ``model`` on ``probe`` once (as :func:`model_output` does) and record what the named
    modules saw and returned on their first call. A module called with no positional tensor (only
    keyword arguments) is not recorded. The precision guard reads the undefended model's output, each
    layer's input and its original output from this one forward."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str) -> Any:
        def fn(_module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if name in inputs or not args or not isinstance(args[0], torch.Tensor):
                return
            if isinstance(out, torch.Tensor):
                inputs[name] = args[0].detach().clone()
                outputs[name] = out.detach().clone()

        return fn

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        output = model_output(model, probe)
    finally:
        for handle in handles:
            handle.remove()
    return Capture(output, inputs, outputs)


def relative_gap(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖output − reference‖_F / ‖reference‖_F in float64 (inf when output is not finite)."""
    out = output.detach().to(torch.float64)
    ref = reference.detach().to(torch.float64)
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    denom = float(torch.linalg.vector_norm(ref))
    diff = float(torch.linalg.vector_norm(out - ref))
    return diff / denom if denom > 0 else (0.0 if diff == 0 else float("inf"))


def max_abs_diff(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output − reference| in float64."""
    return float((output.detach().double() - reference.detach().double()).abs().max())
