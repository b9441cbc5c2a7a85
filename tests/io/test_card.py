"""The model card states the defense's own measured figures and its limits first."""

from __future__ import annotations

import torch

from _tiny import tiny_llama, token_batch
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import default_tolerance
from specdef.io import card


def _facts() -> card.CardFacts:
    model = tiny_llama()
    report = apply_specdef_(
        model, SpecDefConfig(alpha=1e3, top_k=2, targets="preset:llama"), probe=token_batch()
    )
    return card.facts_from_defense(
        report.to_dict(), source="tiny", dtype="float32", tolerance=default_tolerance(torch.float32)
    )


def test_card_carries_the_reports_figures() -> None:
    facts = _facts()
    text = card.model_card(facts)
    assert facts.layers and len(facts.layers) == 6  # gate/v/o of 2 layers
    assert f"{facts.params_before:,} → {facts.params_after:,}" in text
    assert f"({facts.param_ratio:.3f}×)" in text and facts.param_ratio > 1
    assert f"{facts.output_gap:.3g} relative (within the tolerance" in text
    assert "| α | 1000 |" in text and "| top-k | 2 |" in text
    # the limits come before the description of the defense, and name the informed undo
    assert text.index("## Limits") < text.index("## The defense")
    assert "informed attacker undoes" in text and card.INFORMED_PAGE in text
    assert "import specdef" in text  # how to load an Algorithm-1 directory
    assert text.startswith("---\nlibrary_name: transformers\n")


def test_native_card_says_it_is_a_stock_checkpoint() -> None:
    record = {
        "mode": "native", "config": {"alpha": 100.0, "top_k": 4, "method": "exact"},
        "forced": False, "model_output_gap": None,
        "pairs": [{"pair": "layers.0.mlp", "product_error": 3e-7}, {"pair": "layers.1.mlp", "product_error": 5e-7}],
    }  # fmt: skip
    facts = card.facts_from_native(
        record, source="src", dtype="float32", params=1000, tolerance=5e-2
    )
    text = card.model_card(facts)
    assert facts.max_error == 5e-7 and facts.param_ratio == 1.0
    assert "rebalance" in text and "stock checkpoint" in text
    assert "| pairs | 2: `layers.0.mlp`, `layers.1.mlp` |" in text
    assert "forward latency | not measured" in text  # no figure is invented when none was measured
