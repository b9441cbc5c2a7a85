"""specdef.defense.probe: the output tensor of any model output, chosen layers' output gaps to
reference layers on the inputs they see in one forward (against a hook-free computation by hand,
taken before a later in-place change), eval mode restored, and the gaps against numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from specdef.defense import probe


def test_output_tensor_finds_the_main_tensor() -> None:
    logits, hidden, other = torch.randn(2, 3), torch.randn(2, 4), torch.randn(5)
    assert probe.output_tensor(logits) is logits
    assert probe.output_tensor(CausalLMOutputWithPast(logits=logits)) is logits
    assert probe.output_tensor(BaseModelOutput(last_hidden_state=hidden)) is hidden
    # logits win over hidden states; a tuple or list yields its first element, recursively
    both = CausalLMOutputWithPast(logits=logits, hidden_states=(hidden,))
    assert probe.output_tensor(both) is logits
    assert probe.output_tensor((logits, other)) is logits
    assert probe.output_tensor([(BaseModelOutput(last_hidden_state=hidden), other)]) is hidden
    with pytest.raises(TypeError, match="Cannot find an output tensor in dict"):
        probe.output_tensor({"scores": logits})


class _Twice(nn.Module):
    """``b`` is called twice (first on tanh(a(x))); ``drop`` makes train mode visible."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(6, 5), nn.Linear(5, 5), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, *, shift: float = 0.0) -> torch.Tensor:
        h = self.b(torch.tanh(self.a(x)) + shift)
        return self.drop(self.b(h))


def _perturbed(layer: nn.Linear, scale: float, seed: int) -> nn.Linear:
    """A copy of ``layer`` with its weight moved by ``scale`` × a Gaussian (a reference layer)."""
    out = copy.deepcopy(layer)
    with torch.no_grad():
        out.weight.add_(
            scale * torch.randn(out.weight.shape, generator=torch.Generator().manual_seed(seed))
        )
    return out


def _gap_by_hand(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.detach().double().numpy(), ref.detach().double().numpy()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_layer_gaps_match_a_hook_free_computation() -> None:
    torch.manual_seed(0)
    model = _Twice().train()
    refs = {"a": _perturbed(model.a, 1e-2, 1), "b": _perturbed(model.b, 1e-1, 2)}
    x = torch.randn(4, 6)
    output, gaps = probe.layer_gaps(model, refs, x)
    w, bias = model.a.weight.detach(), model.a.bias.detach()
    first = torch.tanh(x @ w.T + bias)  # b's first call sees this, by hand
    assert gaps["a"] == pytest.approx(_gap_by_hand(x @ w.T + bias, refs["a"](x)), rel=1e-5)
    b_out = first @ model.b.weight.detach().T + model.b.bias.detach()
    assert gaps["b"] == pytest.approx(_gap_by_hand(b_out, refs["b"](first)), rel=1e-5)
    assert gaps["a"] < gaps["b"]  # the larger perturbation shows: the gaps are not constants
    torch.testing.assert_close(output, probe.model_output(model, x), rtol=0, atol=0)
    assert model.training  # the caller's mode is restored
    assert not model.a._forward_hooks and not model.b._forward_hooks
    # a reference equal to the layer gives 0; a mapping probe is passed as keyword arguments
    _, same = probe.layer_gaps(model, {"b": copy.deepcopy(model.b)}, {"x": x, "shift": 1.0})
    assert same == {"b": 0.0}
    _, shifted = probe.layer_gaps(model, {"b": refs["b"]}, {"x": x, "shift": 1.0})
    assert shifted["b"] == pytest.approx(
        _gap_by_hand(model.b(first + 1.0), refs["b"](first + 1.0)), rel=1e-5
    )


class _InPlace(nn.Module):
    """Overwrites its layer's output in place after the call (as some modelling code does)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return h.mul_(0.0)


def test_layer_gaps_are_taken_before_a_later_in_place_change() -> None:
    torch.manual_seed(0)
    model = _InPlace()
    ref = _perturbed(model.a, 1e-2, 3)
    x = torch.randn(2, 3)
    output, gaps = probe.layer_gaps(model, {"a": ref}, x)
    expected = x @ model.a.weight.detach().T + model.a.bias.detach()
    assert gaps["a"] == pytest.approx(_gap_by_hand(expected, ref(x)), rel=1e-5)
    assert 0 < gaps["a"] < 1 and bool((output == 0).all())


def test_hooks_are_removed_when_the_model_fails() -> None:
    model = _Twice()
    with pytest.raises(RuntimeError):
        probe.layer_gaps(model, {"a": model.a}, torch.randn(2, 7))  # wrong width
    assert not model.a._forward_hooks


def test_model_output_runs_in_eval_mode_without_grad() -> None:
    torch.manual_seed(0)
    model = _Twice().train()
    x = torch.randn(8, 6)
    out = probe.model_output(model, x)
    assert not out.requires_grad and model.training
    # dropout was off: the output is the deterministic function, by hand
    h = torch.tanh(x @ model.a.weight.T + model.a.bias) @ model.b.weight.T + model.b.bias
    expected = h @ model.b.weight.T + model.b.bias
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gaps_match_numpy_in_float64(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 7, generator=gen).to(dtype)
    out = (ref.float() + 1e-3 * torch.randn(3, 7, generator=gen)).to(dtype)
    a, b = out.double().numpy(), ref.double().numpy()
    assert probe.relative_gap(out, ref) == pytest.approx(
        np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-12
    )
    assert probe.max_abs_diff(out, ref) == pytest.approx(np.abs(a - b).max(), rel=1e-12)


def test_gap_edge_cases() -> None:
    ref = torch.ones(4)
    assert probe.relative_gap(ref.clone(), ref) == 0.0
    assert probe.relative_gap(torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref) == float("inf")
    assert probe.relative_gap(torch.tensor([1.0, float("inf"), 1.0, 1.0]), ref) == float("inf")
    zero = torch.zeros(4)
    assert probe.relative_gap(zero.clone(), zero) == 0.0
    assert probe.relative_gap(ref, zero) == float("inf")
    # the difference is taken in float64: in float16, 65504 − (−65504) would overflow to inf
    top = torch.tensor([65504.0], dtype=torch.float16)
    assert probe.max_abs_diff(top, -top) == 131008.0
