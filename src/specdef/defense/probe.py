"""Running a model on a probe batch: its output tensor, chosen layers' output gaps to reference
layers on the inputs the model feeds them (one forward: :func:`layer_gaps`), and relative gaps.
Used by the precision guard (:mod:`specdef.defense.apply`) and ``specdef verify``.

A probe batch is a tensor (passed positionally) or a mapping (passed as keyword arguments, e.g.
``{"input_ids": ..., "attention_mask": ...}``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
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


@torch.no_grad()
def layer_gaps(
    model: nn.Module, references: Mapping[str, nn.Module], probe: Probe
) -> tuple[torch.Tensor, dict[str, float]]:
    """Run ``model`` on ``probe`` once (as :func:`model_output` does) and, for each module named in
    ``references``, on its first call, the :func:`relative_gap` of its output to that of
    ``references[name]`` (a module outside ``model``) applied to the same input. Returns the model's
    main output and the gaps. The gaps are taken inside the forward, before later modules run, so
    no input or output is copied and an in-place operation after the call cannot change them. A
    module called with no positional tensor (only keyword arguments) gets no gap.

    The precision guard runs the defended model through this once: each defended layer's output
    against the original layer's on the input the defended model actually feeds it, and the
    model's output for the model-level gap — one defended forward for both checks."""
    gaps: dict[str, float] = {}
    handles = []

    def hook(name: str) -> Any:
        def fn(_module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if name in gaps or not args or not isinstance(args[0], torch.Tensor):
                return
            if isinstance(out, torch.Tensor):
                gaps[name] = relative_gap(out, references[name](args[0]))

        return fn

    for name in references:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        output = model_output(model, probe)
    finally:
        for handle in handles:
            handle.remove()
    return output, gaps


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
