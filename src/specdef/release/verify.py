"""``specdef verify``: compare a defended checkpoint with its source on a probe batch (logit gap
against the dtype's tolerance), per-layer spectra, and for causal LMs greedy generations and
perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specdef.defense import probe as probing
from specdef.defense.guard import check_tolerance, default_tolerance
from specdef.defense.layer import defended_layers, linear_form
from specdef.errors import SpecdefError
from specdef.io.checkpoint import model_dtype
from specdef.release.sources import PROBE_TEXT, Source, _vocab_size, is_causal_lm, probe_batch

GENERATION_PROMPT = "The capital of France is"


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str = PROBE_TEXT) -> float:
    """exp(mean next-token cross-entropy) of ``text`` (≤ 128 tokens)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :128]
    vocab = _vocab_size(model)
    ids = ids % vocab if vocab else ids
    logits = probing.output_tensor(model(input_ids=ids)).double()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(loss.exp())


@torch.no_grad()
def greedy(model: nn.Module, tokenizer: Any, prompt: str = GENERATION_PROMPT, n: int = 16) -> str:
    """``n`` greedily generated tokens after ``prompt``, decoded (plain argmax loop, no cache)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    vocab = _vocab_size(model)
    ids = ids % vocab if vocab else ids
    start = ids.shape[1]
    for _ in range(n):
        logits = probing.output_tensor(model(input_ids=ids))
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return str(tokenizer.decode(ids[0, start:], skip_special_tokens=True))


@dataclass
class Verification:
    """Outcome of :func:`verify`; ``passed`` iff ``max_rel_diff ≤ tolerance``."""

    max_abs_diff: float
    max_rel_diff: float  # max |Δ output| / max |original output|
    rel_fro_diff: float  # ‖Δ output‖_F / ‖original output‖_F
    tolerance: float
    passed: bool
    params_original: int
    params_defended: int
    dtype: str
    spectra: list[dict[str, Any]] = field(default_factory=list)
    perplexity: dict[str, float] | None = None
    generations: dict[str, str] | None = None

    @property
    def overhead(self) -> float:
        return self.params_defended / max(self.params_original, 1) - 1.0

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["overhead"] = self.overhead
        return out


def spectra_rows(original: nn.Module, defended: nn.Module) -> list[dict[str, Any]]:
    """Per defended layer: σ₁ and σ_{k+1} of the original weight and of the stored ``inflated``."""
    rows = []
    for name, layer in defended_layers(defended).items():
        after = torch.linalg.svdvals(layer.inflated.weight.detach().double())
        row: dict[str, Any] = {
            "layer": name,
            "shape": f"{layer.out_features}×{layer.in_features}",
            "top_k": layer.top_k,
            "sigma1_after": float(after[0]),
            "sigma_k1_after": float(after[layer.top_k]) if layer.top_k < len(after) else math.nan,
        }
        try:
            weight = linear_form(original.get_submodule(name))[0]
        except (AttributeError, SpecdefError):
            weight = None
        if weight is not None:
            before = torch.linalg.svdvals(weight.detach().double())
            row["sigma1_before"] = float(before[0])
            row["sigma_k1_before"] = (
                float(before[layer.top_k]) if layer.top_k < len(before) else math.nan
            )
            row["ratio_sigma1"] = row["sigma1_after"] / row["sigma1_before"]
        rows.append(row)
    return rows


def verify(
    original: Source, defended: Source, *, tolerance: float | None = None, seed: int = 0
) -> Verification:
    """Compare ``defended`` with ``original`` on a probe batch (and, for causal LMs with a
    tokenizer, greedy generations and perplexity on the probe text)."""
    check_tolerance(tolerance)
    tokenizer = defended.tokenizer or original.tokenizer
    batch = probe_batch(original.model, tokenizer, seed=seed)
    ref = probing.model_output(original.model, batch)
    try:
        out = probing.model_output(defended.model, batch)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise SpecdefError(
            f"The defended model cannot run on the source model's probe input "
            f"({str(err).splitlines()[0][:160]}); is OUT a defended copy of SRC?"
        ) from None
    if ref.shape != out.shape:
        raise SpecdefError(
            f"The two models' outputs differ in shape ({tuple(ref.shape)} vs {tuple(out.shape)}); "
            "is OUT a defended copy of SRC?"
        )
    dtype = model_dtype(defended.model)
    tol = tolerance if tolerance is not None else default_tolerance(dtype)
    max_abs = probing.max_abs_diff(out, ref)
    max_rel = max_abs / max(float(ref.detach().double().abs().max()), 1e-30)
    if not math.isfinite(max_abs):
        max_rel = math.inf
    result = Verification(
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        rel_fro_diff=probing.relative_gap(out, ref),
        tolerance=tol,
        passed=max_rel <= tol,
        params_original=sum(p.numel() for p in original.model.parameters()),
        params_defended=sum(p.numel() for p in defended.model.parameters()),
        dtype=str(dtype).removeprefix("torch."),
        spectra=spectra_rows(original.model, defended.model),
    )
    if tokenizer is not None and is_causal_lm(original.model):
        result.perplexity = {
            "original": perplexity(original.model, tokenizer),
            "defended": perplexity(defended.model, tokenizer),
        }
        result.generations = {
            "prompt": GENERATION_PROMPT,
            "original": greedy(original.model, tokenizer),
            "defended": greedy(defended.model, tokenizer),
        }
    return result
