"""What :func:`specdef.informed.detect.detect` reports: the compensation layers, the Algorithm 1 pairs with
their spectral evidence, every scanned layer's spectrum and role, and (when the architecture is
known) the natively deformed symmetric pairs. Plain frozen dataclasses; public through
:mod:`specdef.informed.detect`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# log10 of a balancing factor of 10. Measured (scripts/native_detect_threshold.py, docs/attacks.md):
# ≤ 0.53 on every undefended pair of SmolLM2, MiniLM, the digits MLP / ViT and tiny random models;
# ≥ 1.93 on every pair deformed with α = 1e2; α = 10 straddles it (0.93–1.27) and is not reliably found
NATIVE_THRESHOLD = 1.0


@dataclass(frozen=True)
class NativePair:
    """A symmetric pair (:class:`specdef.native.pairs.SymmetricPair`) and its imbalance score.

    ``imbalance_log10``: log10 of the largest factor the balancing transform would apply (≈ log10 α
    for a pair deformed natively with α); ``deformed``: the score is at or above the threshold."""

    inflated: str
    compensating: str
    kind: str
    imbalance_log10: float
    deformed: bool

    @property
    def balance_factor(self) -> float:
        return float(10.0**self.imbalance_log10)


@dataclass(frozen=True)
class Compensation:
    """A square layer whose spectrum is {1 (m−k times), 1/α (k times)}: a compensation."""

    name: str
    size: int
    top_k: int
    alpha: float  # 1 / mean of the small eigenvalues
    symmetry_error: float
    cluster_spread: float  # max relative deviation within the 1/α cluster
    identity_error: float  # max |λ − 1| within the identity part


@dataclass(frozen=True)
class Pair:
    """An inflated layer and the compensation that undoes it, with the evidence."""

    inflated: str
    compensation: str
    top_k: int
    alpha: float
    alignment: float  # mean cos² of principal angles between top-k(inflated) and range(P)
    top_gap: float  # σ_k/σ_{k+1} of the inflated weight
    product_gap: float  # σ_k/σ_{k+1} of C·W̃ (the original layer's own gap)
    sigma1_ratio: float  # σ_1(W̃)/σ_1(C·W̃), ≈ α for a true pair
    cond_inflated: float
    cond_compensation: float
    cond_product: float
    transposed: bool  # the stored weight was n×m (a Conv1D-style layout)


@dataclass(frozen=True)
class LayerSpectrum:
    """Spectral evidence for every scanned 2-D weight."""

    name: str
    shape: tuple[int, int]
    gap: float  # largest σ_i/σ_{i+1} over i ≤ rank/2 (1-based i)
    gap_index: int  # the i of that gap (the suspected k)
    cond: float  # σ_1/σ_min over min(m, n) singular values
    role: str  # "inflated", "compensation", "native-inflated", "native-compensating", "suspect", "clean"


@dataclass(frozen=True)
class Detection:
    """What :func:`detect` found. ``pairs`` and ``suspects`` are what a transform acts on.

    ``native``: every symmetric pair with its imbalance score, or ``None`` when the architecture is
    unknown (raw tensors without ``config.json``), so native deformation was not checked;
    ``native_threshold``: the score from which a pair counts as deformed."""

    pairs: list[Pair]
    unpaired_compensations: list[Compensation]
    suspects: list[LayerSpectrum]
    layers: list[LayerSpectrum] = field(repr=False)
    native: list[NativePair] | None = None
    native_threshold: float = NATIVE_THRESHOLD

    @property
    def native_deformed(self) -> list[NativePair]:
        return [p for p in self.native or [] if p.deformed]

    @property
    def defended(self) -> list[str]:
        """Names of the layers that look deformed (inflated side of each pair, suspects, then the
        inflated side of each natively deformed pair)."""
        return (
            [p.inflated for p in self.pairs]
            + [s.name for s in self.suspects]
            + [p.inflated for p in self.native_deformed]
        )

    @property
    def found_anything(self) -> bool:
        return bool(
            self.pairs or self.unpaired_compensations or self.suspects or self.native_deformed
        )

    def to_dict(self) -> dict[str, Any]:
        native = None if self.native is None else [
            {**asdict(p), "balance_factor": p.balance_factor} for p in self.native
        ]  # fmt: skip
        return {
            "pairs": [asdict(p) for p in self.pairs],
            "unpaired_compensations": [asdict(c) for c in self.unpaired_compensations],
            "suspects": [asdict(s) for s in self.suspects],
            "native": native,
            "native_threshold": self.native_threshold,
            "layers": [asdict(s) for s in self.layers],
        }
