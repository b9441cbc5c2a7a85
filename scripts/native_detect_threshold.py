"""Evidence for ``specdef.informed.detect.DetectConfig.native_threshold``: the per-pair imbalance score
(``specdef.native.apply.native_imbalance``: log10 of the largest factor the joint balancing applies) on
undefended models and on natively defended copies at several α, top-k and selections.

Per model: the largest score over the undefended pairs; the largest over the pairs a defended copy
did *not* deform (the neighbour of a deformed pair in a ReLU chain shares a layer with it and must not
be flagged); the smallest over the deformed pairs, per α. The summary table is written into
``docs/attacks.md`` (between the ``native-detect-table`` markers); ``--no-smollm2`` only prints.

    .venv/bin/python scripts/native_detect_threshold.py            # ≈ 2.5 min on one core
    .venv/bin/python scripts/native_detect_threshold.py --no-smollm2
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from specdef.defense.config import SpecDefConfig
from specdef.informed.detect import DetectConfig
from specdef.native.apply import apply_native_, native_imbalance
from specdef.native.pairs import find_symmetric_pairs
from specdef.utils.files import replace_marked_region
from specdef.zoo import load_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "attacks.md"
START, END = "<!-- native-detect-table:start -->", "<!-- native-detect-table:end -->"
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


def _selections(model: torch.nn.Module) -> list[tuple[str, list[str] | None]]:
    """All pairs, the first, the last, every other one. A pair is named by its inflated side, the
    last by its compensating side (which only that pair contains in a ReLU chain)."""
    pairs = find_symmetric_pairs(model)
    names = [p.inflated for p in pairs[:-1]] + [pairs[-1].compensating]
    out: list[tuple[str, list[str] | None]] = [("all", None), ("first", names[:1])]
    out.append(("last", names[-1:]))
    if len(names) > 2:
        out.append(("every-other", names[::2]))
    return out


def measure(name: str) -> dict[str, float]:
    base = load_model(name)
    clean = native_imbalance(base)
    row = {"pairs": float(len(clean)), "undefended": max(clean.values()), "neighbours": 0.0}
    for alpha in ALPHAS:
        lowest = float("inf")
        for k in TOP_KS:
            for label, targets in _selections(base):
                model = copy.deepcopy(base)
                method = "randomized" if name == "smollm2-135m" else "exact"
                records = apply_native_(
                    model,
                    SpecDefConfig(alpha=alpha, top_k=k, targets=targets, method=method, force=True),
                )
                deformed = {r.pair for r in records}
                scores = native_imbalance(model)
                low = min(scores[p] for p in deformed)
                rest = [s for p, s in scores.items() if p not in deformed]
                row["neighbours"] = max(row["neighbours"], *rest, 0.0)
                lowest = min(lowest, low)
                print(
                    f"{name} α={alpha:g} k={k} {label} ({len(deformed)} deformed): "
                    f"deformed min {low:.2f}, others max {max(rest, default=0.0):.2f}",
                    flush=True,
                )
                del model
        row[f"{alpha:g}"] = lowest
    return row


def render(rows: dict[str, dict[str, float]]) -> str:
    threshold = DetectConfig().native_threshold
    lines = [
        f"Per-pair imbalance (log10), threshold {threshold:.1f}. Deformed copies: top-k ∈ "
        f"{{{', '.join(map(str, TOP_KS))}}} × selections (all pairs, the first, the last, every "
        "other) per α, fp32. Regenerate with `.venv/bin/python scripts/native_detect_threshold.py`.",
        "",
        "| model | symmetric pairs | undefended: largest | undeformed pairs of defended copies: "
        "largest | " + " | ".join(f"deformed at α = {a:g}: smallest" for a in ALPHAS) + " |",
        "|---|---|---|---|" + "---|" * len(ALPHAS),
    ]
    for name, row in rows.items():
        cells = [
            name,
            f"{int(row['pairs'])}",
            f"{row['undefended']:.2f}",
            f"{row['neighbours']:.2f}",
        ]
        cells += [f"{row[f'{a:g}']:.2f}" for a in ALPHAS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2; print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = [m for m in MODELS if not (args.no_smollm2 and m == "smollm2-135m")]
    table = render({name: measure(name) for name in models})
    print(table)
    if not args.no_smollm2:
        replace_marked_region(DOC, START, END, "\n" + table)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
