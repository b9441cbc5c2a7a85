"""Evidence for ``specdef.detect.DetectConfig.native_threshold``: the per-pair imbalance score
(``specdef.native.native_imbalance``, log10 of the largest balancing factor) on undefended models
and on natively defended copies at several α, top-k and selections.

For each model it prints the largest score over the undefended pairs, and for each defended copy the
smallest score over the pairs that were deformed and the largest over the pairs that were not (the
neighbour of a deformed pair in a ReLU chain shares a layer with it: the joint score must not flag it). ``docs/attacks.md`` ("Detecting native deformation") quotes
this table.

    .venv/bin/python scripts/native_detect_threshold.py            # ≈ 1 min on one core
    .venv/bin/python scripts/native_detect_threshold.py --no-smollm2
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from specdef.native import apply_native_, find_symmetric_pairs, native_imbalance
from specdef.zoo import load_model

MODELS = (
    "tiny-llama",
    "tiny-gpt2",
    "tiny-bert",
    "mlp-digits",
    "vit-digits",
    "minilm-l6",
    "smollm2-135m",
)
ALPHAS = (1e1, 1e2, 1e4)
TOP_KS = (1, 8)


def _selections(names: list[str]) -> list[tuple[str, list[str] | None]]:
    """All pairs, the first, the last, every other pair (by inflated-side name; the last of a
    ReLU chain is selected by its compensating side, which only that pair contains)."""
    out: list[tuple[str, list[str] | None]] = [("all", None), ("first", names[:1])]
    out.append(("last", names[-1:]))
    if len(names) > 2:
        out.append(("every-other", names[::2]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | pairs | undefended max | α | k | selection | deformed min | others max |")
    print("|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        if name == "smollm2-135m" and args.no_smollm2:
            continue
        base = load_model(name)
        pairs = find_symmetric_pairs(base)
        clean = native_imbalance(base)
        top = max(clean.values())
        print(f"| {name} | {len(pairs)} | {top:.2f} | — | — | — | — | — |", flush=True)
        inflated = [p.inflated for p in pairs]
        inflated[-1] = pairs[-1].compensating
        for alpha in ALPHAS:
            for k in TOP_KS:
                for label, targets in _selections(inflated):
                    model = copy.deepcopy(base)
                    records = apply_native_(
                        model, alpha=alpha, top_k=k, targets=targets, force=True,
                        method="randomized" if name == "smollm2-135m" else "exact",
                    )  # fmt: skip
                    deformed = {r.pair for r in records}
                    scores = native_imbalance(model)
                    low = min(scores[p] for p in deformed)
                    rest = [s for p, s in scores.items() if p not in deformed]
                    others = f"{max(rest):.2f}" if rest else "—"
                    print(
                        f"| {name} | {len(pairs)} | {top:.2f} | {alpha:g} | {k} | {label} "
                        f"({len(deformed)}) | {low:.2f} | {others} |",
                        flush=True,
                    )
                    del model
        del base
    return 0


if __name__ == "__main__":
    sys.exit(main())
