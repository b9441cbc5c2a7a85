"""The model card (``README.md``) written into every defended output: what was defended and how,
what it costs, how well the function is preserved, the precision limit of its dtype, how to load it
— and, first among its limits, that an informed attacker undoes it.

Pure text from the defense record (a manifest's ``defense`` dict, or the native record), so the
in-memory and streaming paths write the same card for the same defense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CARD = "README.md"
PROJECT = "specdef"
# pages of the specdef documentation the card points to (relative to the project's docs/)
INFORMED_PAGE = "docs/results/informed_attacks.md"
PRECISION_PAGE = "docs/precision.md"
RESULTS_PAGE = "docs/results/README.md"


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states; each field comes from a measured record, none is typed in."""

    mode: str  # "algorithm1" or "native"
    source: str
    alpha: float
    top_k: int
    method: str
    layers: tuple[str, ...]  # defended layers (Algorithm 1) or deformed pairs (native)
    dtype: str
    params_before: int
    params_after: int
    output_gap: float | None  # max relative model-output gap on the probe batch
    max_error: float  # largest per-layer (per-pair) reconstruction error in the stored dtype
    tolerance: float
    forced: bool
    latency_ratio: float | None = None  # defended / undefended forward time on the probe batch

    @property
    def param_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)


def facts_from_defense(
    defense: Mapping[str, Any],
    *,
    source: str,
    dtype: str,
    tolerance: float,
    latency_ratio: float | None = None,
) -> CardFacts:
    """Facts of an Algorithm-1 defense from :meth:`specdef.defense.apply.DefenseReport.to_dict`."""
    config = defense.get("config") or {}
    layers = [layer for layer in defense.get("layers") or [] if isinstance(layer, Mapping)]
    cost = defense.get("inference_cost")
    if latency_ratio is None and isinstance(cost, Mapping):
        latency_ratio = _float_or_none(cost.get("latency_ratio"))
    return CardFacts(
        mode="algorithm1",
        source=source,
        alpha=float(config.get("alpha", math.nan)),
        top_k=int(config.get("top_k", 0)),
        method=str(config.get("method", "")),
        layers=tuple(str(layer.get("name")) for layer in layers),
        dtype=dtype,
        params_before=int(defense.get("params_before", 0)),
        params_after=int(defense.get("params_after", 0)),
        output_gap=_float_or_none(defense.get("model_output_gap")),
        max_error=max(
            (float(layer.get("reconstruction_error", 0.0)) for layer in layers), default=0.0
        ),
        tolerance=tolerance,
        forced=bool(defense.get("forced", False)),
        latency_ratio=latency_ratio,
    )


def facts_from_native(
    record: Mapping[str, Any],
    *,
    source: str,
    dtype: str,
    params: int,
    tolerance: float,
    latency_ratio: float | None = None,
) -> CardFacts:
    """Facts of a native deformation from its record (:func:`specdef.io.checkpoint.native_record`;
    the parameter count is unchanged by construction)."""
    config = record.get("config") or {}
    pairs = [p for p in record.get("pairs") or [] if isinstance(p, Mapping)]
    return CardFacts(
        mode="native",
        source=source,
        alpha=float(config.get("alpha", math.nan)),
        top_k=int(config.get("top_k", 0)),
        method=str(config.get("method", "")),
        layers=tuple(str(p.get("pair")) for p in pairs),
        dtype=dtype,
        params_before=params,
        params_after=params,
        output_gap=_float_or_none(record.get("model_output_gap")),
        max_error=max((float(p.get("product_error", 0.0)) for p in pairs), default=0.0),
        tolerance=tolerance,
        forced=bool(record.get("forced", False)),
        latency_ratio=latency_ratio,
    )


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _num(value: float | None, spec: str = ".3g") -> str:
    return "not measured" if value is None or not math.isfinite(value) else format(value, spec)


def _layer_lines(layers: Sequence[str], limit: int = 12) -> str:
    shown = [f"`{name}`" for name in layers[:limit]]
    rest = len(layers) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest > 0 else "")


def model_card(facts: CardFacts) -> str:
    """The card's markdown (with Hugging Face front matter)."""
    native = facts.mode == "native"
    what = "native deformation (no extra layers)" if native else "SpecDef Algorithm 1"
    undo = (
        "`specdef transform DIR --adaptive rebalance` moves every deformed pair back to its "
        "balanced form with no extra parameters"
        if native
        else "multiplying each compensation back into its layer (`--adaptive fuse`) restores the "
        "original weights and model size"
    )
    load = (
        "It is a stock checkpoint: `from_pretrained` loads it with or without specdef."
        if native
        else "Loading needs specdef (`pip install specdef`): run `import specdef` before "
        "`AutoModel*.from_pretrained(DIR)`. Without it, transformers refuses the directory "
        "(model type `specdef`) rather than load the defended layers as random weights."
    )
    gap_ok = facts.output_gap is not None and facts.output_gap <= facts.tolerance
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- specdef",
        "- tamper-resistance",
        f"- specdef-{facts.mode}",
        "---",
        "",
        f"# Defended with {PROJECT} ({what})",
        "",
        f"Source model: `{facts.source}`. Every defended weight W had its top-{facts.top_k} singular "
        f"values multiplied by α = {facts.alpha:g}"
        + (
            " along an exact symmetry of the network, so the architecture is unchanged."
            if native
            else ", with a compensation layer C inserted so that C·W̃ = W."
        )
        + " The model computes the same function up to rounding; fine-tuning it is harder because "
        "the training loss's Hessian grows with α (arXiv 2602.18868).",
        "",
        "## Limits — read these first",
        "",
        f"- **An informed attacker undoes this defense**: {undo}, after which fine-tuning converges "
        f"at the undefended rate. Measured in {PROJECT}'s `{INFORMED_PAGE}`.",
        "- The defense slows optimization; it does not make harmful fine-tuning impossible. How much "
        f"it slows a searched attacker, per threshold, is on {PROJECT}'s `{RESULTS_PAGE}`.",
        f"- α is bounded by the storage dtype ({facts.dtype}): the guard's tolerance for it is "
        f"{facts.tolerance:.3g} relative error (`{PRECISION_PAGE}`).",
        "",
        "## The defense",
        "",
        "| | |",
        "|---|---|",
        f"| mode | {facts.mode} |",
        f"| α | {facts.alpha:g} |",
        f"| top-k | {facts.top_k} |",
        f"| method | {facts.method or '—'} |",
        f"| {'pairs' if native else 'layers'} | {len(facts.layers)}: {_layer_lines(facts.layers)} |",
        f"| dtype | {facts.dtype} |",
        "",
        "## Cost and fidelity",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {facts.params_before:,} → {facts.params_after:,} "
        f"({facts.param_ratio:.3f}×) |",
        f"| forward latency | {_num(facts.latency_ratio, '.2f')}"
        + ("×" if facts.latency_ratio is not None else "")
        + " the undefended model's on the probe batch |",
        f"| model output gap | {_num(facts.output_gap)} relative "
        f"({'within' if gap_ok else 'NOT within' if facts.output_gap is not None else 'vs'} "
        f"the tolerance {facts.tolerance:.3g}) |",
        f"| largest reconstruction error | {_num(facts.max_error)} |",
        f"| forced past the guard | {'yes' if facts.forced else 'no'} |",
        "",
        "## Loading",
        "",
        load,
        "",
        f"Check it against the source with `specdef verify {facts.source} DIR`.",
        "",
    ]
    return "\n".join(lines)


def transform_card(
    *, source: str, transform: str, params_before: int, params_after: int, probe_gap: float
) -> str:
    """The card of an informed transform's output (``specdef transform … -o``): a model whose
    defense an informed attacker has undone — said first, so nobody mistakes it for a release."""
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags:",
            "- specdef",
            "- specdef-transformed",
            "---",
            "",
            f"# `{source}` after the informed transform `{transform}`",
            "",
            "**This model is not defended.** It is what an informed attacker makes of a "
            f"{PROJECT}-defended model: `{transform}` preserves the function and removes the "
            "convergence-rate control, so fine-tuning it converges at the undefended rate "
            f"(measured in {PROJECT}'s `{INFORMED_PAGE}`).",
            "",
            "| | |",
            "|---|---|",
            f"| parameters | {params_before:,} → {params_after:,} |",
            f"| output gap vs the input model | {_num(probe_gap)} relative, on the probe batch |",
            "",
        ]
    )


def _metric_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    keys = [k for k in before if k in after]
    return [
        f"| {key} | {_num(_float_or_none(before[key]))} | {_num(_float_or_none(after[key]))} |"
        for key in keys
    ]


def defense_card(
    record: Mapping[str, Any],
    *,
    source: str,
    dtype: str,
    params_before: int,
    params_after: int,
    specdef_facts: CardFacts | None = None,
) -> str:
    """The card of a model defended by a registry defense other than SpecDef alone (``specdef
    defend --defense NAME``): what the defense is and cites, the deviations scale forced, what it
    measured before and after on held-out data, and first among its limits that it is a small
    baseline whose resistance to a searched attacker is measured, not promised. A defense that
    ends with SpecDef (``unlearned-specdef``) appends SpecDef's own card."""
    name = str(record.get("name", "?"))
    inner = record.get("unlearning") if isinstance(record.get("unlearning"), Mapping) else None
    measured = inner if inner is not None else record
    before = measured.get("before") or {}
    after = measured.get("after") or {}
    training = measured.get("training") or {}
    config = record.get("config") or {}
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        f"- {PROJECT}",
        "- tamper-resistance",
        f"- defense-{name}",
        "---",
        "",
        f"# `{source}` defended with `{name}` ({PROJECT} baseline defense)",
        "",
        f"Written from: {record.get('cites', '—')}.",
        "",
        "## Limits — read these first",
        "",
        "- This is a small baseline written from its paper's loss at CPU scale, not the paper's "
        f"model or data. Deviations: {record.get('deviations', '—')}.",
        "- A defense that changes the weights is not known to stop a worst-case attacker: how many "
        f"steps a searched attacker needs to relearn is measured on {PROJECT}'s `{RESULTS_PAGE}`.",
        "",
        "## The defense",
        "",
        "| | |",
        "|---|---|",
        f"| defense | `{name}` |",
        *(f"| {key} | `{value}` |" for key, value in config.items()),
        f"| dtype | {dtype} |",
        f"| parameters | {params_before:,} → {params_after:,} |",
        f"| training steps | {training.get('steps_run', '—')} |",
        "",
    ]
    rows = _metric_rows(before, after)
    if rows:
        lines += [
            "## Measured on held-out data" + (f" (by `{inner.get('name')}`)" if inner else ""),
            "",
            "| metric | before | after |",
            "|---|---|---|",
            *rows,
            "",
        ]
    lines += ["Load it with `specdef` (`specdef inspect DIR`, `specdef attack DIR …`).", ""]
    if specdef_facts is not None:
        lines += ["", "## Then SpecDef", "", model_card(specdef_facts).split("---\n", 2)[-1]]
    return "\n".join(lines)
