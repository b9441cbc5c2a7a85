"""The defended layer: :class:`DefendedLinear` (a stock ``inflated`` ``nn.Linear`` followed by a stock
``compensation`` ``nn.Linear``), what counts as a defendable linear layer, and the helpers every
module uses to find defended layers and the roles of their parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from specdef.errors import SpecdefError


class DefendedLinear(nn.Module):
    """``forward(x) = compensation(inflated(x))``: an m×n ``inflated`` layer (W̃ = T·W, no bias)
    followed by an m×m ``compensation`` layer (C = T⁻¹, original bias). Both are stock
    ``nn.Linear`` so optimizers, peft and hooks see ordinary layers.

    ``source`` records what was replaced (``"linear"`` or ``"conv1d"``), so the undo restores it.
    A new layer holds zeros until its weights are copied or loaded in.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        alpha: float,
        top_k: int,
        source: str = "linear",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        # skip_init builds on the meta device, then allocates on ``device`` (None: the default one)
        factory = {
            "dtype": dtype,
            "device": device if device is not None else torch.empty(0).device,
        }
        # every caller copies W̃ and C in right after, so skip nn.Linear's random init (drawing the
        # m×m uniform was ≈9 % of defending SmolLM2) and start from zeros, never uninitialised memory
        self.inflated = nn.utils.skip_init(
            nn.Linear, in_features, out_features, bias=False, **factory
        )
        self.compensation = nn.utils.skip_init(
            nn.Linear, out_features, out_features, bias=bias, **factory
        )
        with torch.no_grad():
            for param in self.parameters():
                param.zero_()
        self.alpha = float(alpha)
        self.top_k = int(top_k)
        self.source = source

    @classmethod
    def from_weights(
        cls,
        inflated: torch.Tensor,
        compensation: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        alpha: float,
        top_k: int,
        source: str = "linear",
    ) -> DefendedLinear:
        """A layer holding ``inflated`` (W̃, m×n) and ``compensation`` (C, m×m) as its parameters
        (the tensors themselves, not copies: the caller hands them over) and a copy of ``bias``.
        Built on the meta device first, so nothing is allocated, zeroed or copied twice."""
        m, n = inflated.shape
        out = cls(n, m, bias=bias is not None, alpha=alpha, top_k=top_k, source=source,
                  dtype=inflated.dtype, device="meta")  # fmt: skip
        out.inflated.weight = nn.Parameter(inflated.detach())
        out.compensation.weight = nn.Parameter(compensation.detach())
        if bias is not None:
            out.compensation.bias = nn.Parameter(bias.detach().to(inflated.dtype, copy=True))
        return out

    @classmethod
    def identity_slot(cls, layer: nn.Linear, *, top_k: int) -> DefendedLinear:
        """Algorithm 1's slot before any inflation (α = 1): W̃ = W and C = I, the layer's bias on
        C — the same function and structure as a defended layer, the undefended curvature."""
        m, n = layer.weight.shape
        ref = layer.weight
        out = cls(n, m, bias=layer.bias is not None, alpha=1.0, top_k=top_k, dtype=ref.dtype,
                  device=ref.device)  # fmt: skip
        with torch.no_grad():
            out.inflated.weight.copy_(layer.weight)
            out.compensation.weight.copy_(torch.eye(m, dtype=ref.dtype, device=ref.device))
            if layer.bias is not None:
                out.compensation.bias.copy_(layer.bias)
        return out

    @property
    def in_features(self) -> int:
        return self.inflated.in_features

    @property
    def out_features(self) -> int:
        return self.inflated.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The effective m×n weight C·W̃ (= W up to rounding) in the layer's dtype, for modelling
        code that reads ``layer.weight`` (T5 checks its dtype). Read-only: a detached product, not a
        parameter — training updates ``inflated`` and ``compensation``."""
        return self.fused_weight().to(self.inflated.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's bias (carried by ``compensation``)."""
        return self.compensation.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compensation(self.inflated(x))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, top_k={self.top_k}, source={self.source!r}"

    def fused_weight(self) -> torch.Tensor:
        """C·W̃ (m×n), multiplied in float64 and returned in float64."""
        comp = self.compensation.weight.detach().to(torch.float64)
        return comp @ self.inflated.weight.detach().to(torch.float64)

    def fuse(self) -> nn.Module:
        """One layer of the ``source`` kind computing ``C·W̃·x + b`` (weights in this dtype)."""
        weight = self.fused_weight()
        dtype, device = self.inflated.weight.dtype, self.inflated.weight.device
        bias = self.compensation.bias
        if self.source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            layer: Any = Conv1D(self.out_features, self.in_features)
            layer.to(device=device, dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(weight.T)
                if bias is not None:
                    layer.bias.copy_(bias.detach())
                else:
                    layer.bias.zero_()
            return layer
        out = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, dtype=dtype, device=device
        )
        with torch.no_grad():
            out.weight.copy_(weight)
            if bias is not None:
                out.bias.copy_(bias.detach())
        return out


def linear_form(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``(W m×n, bias or None, source)`` of a defendable layer; Conv1D's weight is transposed."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, "linear"
    if type(module).__name__ == "Conv1D" and isinstance(module, linear_kinds()):
        conv: Any = module
        return conv.weight.T, conv.bias, "conv1d"
    raise SpecdefError(
        f"Cannot defend a {type(module).__name__}: SpecDef supports nn.Linear and Conv1D; "
        "exclude this layer."
    )


def defended_layers(model: nn.Module) -> dict[str, DefendedLinear]:
    """Every :class:`DefendedLinear` of ``model`` by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DefendedLinear)}


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Each parameter name → ``"inflated"``, ``"compensation"`` or ``"untouched"``."""
    prefixes = list(defended_layers(model))
    roles: dict[str, str] = {}
    for name, _ in model.named_parameters():
        role = "untouched"
        for prefix in prefixes:
            if name.startswith(prefix + ".inflated."):
                role = "inflated"
            elif name.startswith(prefix + ".compensation."):
                role = "compensation"
        roles[name] = role
    return roles


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_kinds() -> tuple[type[nn.Module], ...]:
    """Module classes SpecDef can defend: ``nn.Linear`` and transformers' ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)
