"""What :func:`specdef.defense.apply.apply_specdef_` refuses: the default tolerances, the checks run
before any layer is deformed (tied weights, rank bound, finite entries) and the precision guard's
refusals after it (one layer above tolerance, or the whole model's probe output).

Pure checks over tensors and numbers: nothing here builds or replaces a module, so the defense
imports this module and not the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from specdef.errors import SpecdefError
from specdef.linalg import spectral

# Default precision-guard tolerance on relative errors (each layer's ‖C·W̃ − W‖/‖W‖ and probe output
# gap, the model's probe output gap, and `specdef verify`'s max |Δ output| / max |output|), per dtype.
# From the measurements in docs/precision.md: SmolLM2-135M with the paper's setting (α = 1e4, k = 25,
# gate/v/o of all 30 layers) in float32 moves its logits by ≈ 1e-2 relative, so 5e-2 accepts it with
# margin while α = 1e9 (error ≈ 10–100) is refused; in bfloat16/float16 the same bound admits α of
# order 10, and α = 1e4 (error ≈ 1–10) is refused.
#
# This is the one table: Algorithm 1 (in memory and streaming), native mode (each pair's product
# error) and `specdef verify` all read it through `default_tolerance`. A dtype it does not list
# (none that `--dtype` or the streaming reader accepts) gets FALLBACK_TOLERANCE, the bound of the
# listed low-precision dtypes; native mode used 1e-2 there before the defend paths were unified
# (docs/precision.md).
DEFAULT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 5e-2,
    torch.bfloat16: 5e-2,
    torch.float16: 5e-2,
}
FALLBACK_TOLERANCE = 5e-2


def default_tolerance(dtype: torch.dtype) -> float:
    """:data:`DEFAULT_TOLERANCE` for ``dtype`` (:data:`FALLBACK_TOLERANCE` for a dtype it does not
    list)."""
    return DEFAULT_TOLERANCE.get(dtype, FALLBACK_TOLERANCE)


def check_tolerance(value: float | None, *, name: str = "tolerance") -> float | None:
    """``value`` unchanged when it is ``None`` (the dtype's default) or a finite number > 0; a
    :class:`SpecdefError` naming ``name`` (e.g. ``"--tolerance"``) otherwise. The one check of a
    user-given tolerance: the defense config, ``verify`` and the CLI all call it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecdefError(f"Expected {name} to be a number > 0, found {value!r}; e.g. 1e-5.")
    if not (math.isfinite(value) and value > 0):
        raise SpecdefError(f"Expected {name} > 0 (finite), found {value}; e.g. 1e-5.")
    return value


def _shared_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """For each selected layer whose weight is also registered elsewhere (tied weights), the other
    names it is registered under. Defending such a layer would silently untie the weights."""
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    out: dict[str, list[str]] = {}
    for name in names:
        weight = model.get_submodule(name).weight
        others = [p for p in owners.get(id(weight), []) if p != f"{name}.weight"]
        if others:
            out[name] = others
    return out


def check_untied(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse a selected layer whose weight is tied to another parameter (defending it would
    untie them)."""
    tied = _shared_parameters(model, names)
    if tied:
        name, others = next(iter(tied.items()))
        raise SpecdefError(
            f"Layer {name!r} shares its weight with {', '.join(others)} (tied weights); defending "
            f"it would untie them. Exclude it (e.g. --exclude {name.rsplit('.', 1)[-1]})."
        )


def check_rank(name: str, shape: Sequence[int], *, top_k: int) -> None:
    """Refuse layer ``name`` (``shape`` (m, n) in the Linear form) when ``top_k > min(m, n)``; the
    streaming path calls this from the checkpoint header, before any tensor is read."""
    m, n = shape
    if top_k > min(m, n):
        raise SpecdefError(
            f"top_k={top_k} exceeds the rank bound min(m, n)={min(m, n)} of layer "
            f"{name!r} ({m}×{n}); choose --top-k ≤ {min(m, n)} or exclude this layer."
        )


def check_layer(name: str, weight: torch.Tensor, bias: torch.Tensor | None, *, top_k: int) -> None:
    """Refuse, before anything is deformed, layer ``name`` (``weight`` m×n in the Linear form) when
    ``top_k > min(m, n)`` or its weight or bias has a NaN/Inf entry."""
    check_rank(name, tuple(weight.shape), top_k=top_k)
    check_finite(name, "weight", weight)
    if bias is not None:
        check_finite(name, "bias", bias)


def check_finite(name: str, label: str, tensor: torch.Tensor) -> None:
    """Refuse layer ``name`` when its ``label`` tensor (weight or bias) has a NaN/Inf entry."""
    if not spectral.all_finite(tensor):
        raise SpecdefError(
            f"Layer {name!r} has NaN or Inf entries in its {label}; repair the checkpoint "
            "before defending it."
        )


def over_tolerance_ratio(
    reconstruction_error: float, output_gap: float | None, tolerance: float
) -> float:
    """The larger of a layer's two measured errors over its tolerance (> 1: the guard refuses)."""
    return max(reconstruction_error, output_gap or 0.0) / tolerance


def layer_refusal(
    name: str,
    weight: torch.Tensor,
    basis: torch.Tensor,
    *,
    reconstruction_error: float,
    output_gap: float | None,
    tolerance: float,
    alpha: float,
) -> SpecdefError:
    """The error for layer ``name`` (original ``weight`` m×n, top-k ``basis``) above ``tolerance``:
    names the larger of its two errors and the largest alpha that fits its dtype."""
    dtype = weight.dtype
    safe = spectral.max_safe_alpha(weight, basis, dtype=dtype, tolerance=tolerance, start=alpha)
    if reconstruction_error >= (output_gap or 0.0):
        what, found = "reconstruction error ‖C·W̃−W‖/‖W‖", reconstruction_error
    else:
        what, found = "probe output gap", float(output_gap or 0.0)
    short = str(dtype).removeprefix("torch.")
    return SpecdefError(
        f"Precision guard: layer {name!r} has {what} {found:.3g} in {short} at alpha={alpha:g}, "
        f"above the tolerance {tolerance:.3g}; the largest alpha that fits {short} here is ≈{safe:g}. "
        "Lower --alpha, store the model in a wider dtype, raise --tolerance, or pass --force."
    )


def model_gap_refusal(
    model_gap: float,
    *,
    tolerance: float,
    dtype: torch.dtype,
    alpha: float,
    worst_layer: str,
    worst_error: float,
) -> SpecdefError:
    """The error for a model whose probe output moved by ``model_gap`` (relative) above
    ``tolerance`` although every layer passed; names the worst layer and an estimated safe alpha."""
    short = str(dtype).removeprefix("torch.")
    # the gap grows linearly in alpha (docs/precision.md): scale down, with a margin
    ratio = tolerance / model_gap if math.isfinite(model_gap) and model_gap > 0 else 1e-3
    safe = spectral.round_down(1.0 + (alpha - 1.0) * 0.8 * ratio)
    return SpecdefError(
        f"Precision guard: the model output on the probe batch moved by {model_gap:.3g} "
        f"(relative) in {short} at alpha={alpha:g}, above the tolerance {tolerance:.3g} "
        f"(worst layer {worst_layer!r}, reconstruction error "
        f"{worst_error:.3g}); the largest alpha that fits {short} for this "
        f"model is ≈{safe:g} (estimated). Lower --alpha, use a wider dtype, raise "
        "--tolerance, or pass --force."
    )
