"""specdef.release.verify: an undefended copy has gap exactly 0, a defended copy passes within the
dtype's tolerance with the gap, spectra and parameter bill recomputed here, and a broken copy
fails; for a causal LM the perplexity matches a numpy cross-entropy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from _tiny import tiny_bert, tiny_llama
from specdef import zoo
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import DEFAULT_TOLERANCE
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError
from specdef.release.sources import PROBE_TEXT, Source, probe_batch
from specdef.release.verify import perplexity, verify

ALPHA = 1e4


def _source(model: torch.nn.Module, tokenizer: object = None, name: str = "m") -> Source:
    return Source(model, tokenizer, name, "transformers-dir")


def _defended(model: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(model)
    apply_specdef_(out, SpecDefConfig(alpha=ALPHA, top_k=4, targets="preset:llama"))
    return out


def test_an_undefended_copy_has_no_gap() -> None:
    model = tiny_llama()
    result = verify(_source(model), _source(copy.deepcopy(model)))
    assert result.max_abs_diff == result.max_rel_diff == result.rel_fro_diff == 0.0
    assert result.passed and result.overhead == 0.0 and result.spectra == []
    assert result.tolerance == DEFAULT_TOLERANCE[torch.float32] and result.dtype == "float32"


def test_a_defended_copy_passes_with_the_gap_recomputed_here() -> None:
    model = tiny_llama()
    defended = _defended(model)
    result = verify(_source(model), _source(defended))
    batch = probe_batch(model, None)
    assert isinstance(batch, dict)
    with torch.no_grad():
        ref = model(**batch).logits.double().numpy()
        out = defended(**batch).logits.double().numpy()
    max_rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert result.max_rel_diff == pytest.approx(max_rel, rel=1e-9)
    assert result.rel_fro_diff == pytest.approx(
        np.linalg.norm(out - ref) / np.linalg.norm(ref), rel=1e-9
    )
    assert 0 < result.max_rel_diff <= result.tolerance and result.passed
    layers = defended_layers(defended)
    # each defended m×n layer adds its m×m compensation (Llama's projections have no bias)
    extra = sum(layer.out_features**2 for layer in layers.values())
    assert result.params_defended - result.params_original == extra
    assert [row["layer"] for row in result.spectra] == list(layers)
    for row in result.spectra:
        before = np.linalg.svd(
            model.get_submodule(row["layer"]).weight.detach().double().numpy(), compute_uv=False
        )
        after = np.linalg.svd(
            layers[row["layer"]].inflated.weight.detach().double().numpy(), compute_uv=False
        )
        assert row["sigma1_before"] == pytest.approx(before[0], rel=1e-9)
        assert row["sigma1_after"] == pytest.approx(after[0], rel=1e-9)
        assert row["ratio_sigma1"] == pytest.approx(ALPHA, rel=1e-4)
        assert row["sigma_k1_after"] == pytest.approx(before[4], rel=1e-3)  # σ₅ untouched at k = 4


def test_a_broken_copy_fails_and_an_explicit_tolerance_is_honoured() -> None:
    model = tiny_llama()
    defended = _defended(model)
    passed = verify(_source(model), _source(defended))
    strict = verify(_source(model), _source(defended), tolerance=passed.max_rel_diff / 2)
    assert strict.tolerance == passed.max_rel_diff / 2 and not strict.passed
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    result = verify(_source(model), _source(broken))
    assert not result.passed and result.max_rel_diff > result.tolerance


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_a_tolerance_that_is_not_finite_and_positive_is_refused(bad: float) -> None:
    model = tiny_llama()
    with pytest.raises(SpecdefError, match=r"Expected tolerance > 0 \(finite\)"):
        verify(_source(model), _source(model), tolerance=bad)


def test_outputs_of_different_shapes_are_a_user_error() -> None:
    with pytest.raises(SpecdefError, match="outputs differ in shape") as info:
        verify(_source(tiny_llama()), _source(tiny_bert()))
    assert "\n" not in str(info.value)


def test_causal_lm_perplexity_and_generations() -> None:
    model = zoo.load_model("tiny-llama")
    tokenizer = zoo.load_tokenizer("tiny-llama")
    result = verify(_source(model, tokenizer), _source(copy.deepcopy(model), tokenizer))
    assert result.perplexity is not None and result.generations is not None
    assert result.perplexity["original"] == result.perplexity["defended"]
    assert result.generations["original"] == result.generations["defended"]
    # perplexity = exp(mean next-token cross-entropy), by hand with numpy
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :128]
    ids = ids % model.config.vocab_size
    with torch.no_grad():
        z = model(input_ids=ids).logits[0].double().numpy()
    log_probs = (
        z
        - z.max(-1, keepdims=True)
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    )
    targets = ids[0, 1:].numpy()
    nll = -log_probs[np.arange(len(targets)), targets].mean()
    assert perplexity(model, tokenizer) == pytest.approx(float(np.exp(nll)), rel=1e-9)
    assert result.perplexity["original"] == pytest.approx(float(np.exp(nll)), rel=1e-9)
