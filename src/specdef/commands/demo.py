"""``specdef demo``: train a digits MLP, defend it, verify it, print spectra and the function gap;
then attack a zoo model defended vs undefended over a small learning-rate sweep, run one informed
attack, and write a report with a plot."""

from __future__ import annotations

import argparse
from typing import Any

from specdef.commands.common import print_json, print_table
from specdef.defense.config import SpecDefConfig
from specdef.experiments.demo import run_attack_demo, run_demo
from specdef.report.attack import normalize


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "demo",
        help="defend, verify, attack and informed-attack a digits classifier; write a report",
        description="Train a 64-64-64-10 MLP on scikit-learn's digits, apply SpecDef to every "
        "linear layer, save and reload the checkpoint and compare it with the original; then "
        "(unless --no-attack) attack the zoo's mlp-digits undefended, defended and defended+fused "
        "over a small learning-rate sweep and write a report with a plot (about a minute, offline).",
    )
    parser.add_argument("--alpha", type=float, default=1e4, help="inflation factor (> 1)")
    parser.add_argument("--top-k", type=int, default=8, help="singular values inflated per layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="runs/demo", help="folder for the attack demo's results and report"
    )
    parser.add_argument(
        "--no-attack", action="store_true", help="stop after defending and verifying"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    SpecDefConfig(alpha=args.alpha, top_k=args.top_k)  # validate before training
    import torch

    torch.set_num_threads(1)  # tiny models: more threads only add contention on a small CPU
    result = run_demo(alpha=args.alpha, top_k=args.top_k, seed=args.seed)
    attack = None
    if not args.no_attack:
        attack = run_attack_demo(args.out)
    if args.json:
        out = result.to_dict()
        if attack is not None:
            out["attack"] = {
                "report": attack.report,
                "figures": attack.figures,
                "runs": attack.rows,
            }
        print_json(out)
        return 0 if result.passed else 1
    k = args.top_k
    rows = []
    for layer in result.report.layers:
        b, a = layer.sigma_before, layer.sigma_after
        rows.append(
            (
                layer.name,
                f"{layer.shape[0]}×{layer.shape[1]}",
                b[0],
                a[0],
                a[0] / b[0],
                b[min(k - 1, len(b) - 1)],
                a[min(k - 1, len(a) - 1)],
                b[k] if k < len(b) else float("nan"),
                a[k] if k < len(a) else float("nan"),
                layer.reconstruction_error,
            )
        )
    print_table(
        f"Spectra: MLP on digits, SpecDef alpha={args.alpha:g}, top_k={k}, all linear layers",
        ["layer", "m×n", "σ1 before", "σ1 after", "ratio", "σk before", "σk after",
         "σk+1 before", "σk+1 after", "recon err (fp32)"],
        rows,
    )  # fmt: skip
    rep = result.report
    print(
        f"trained {result.n_train} digits in {result.train_seconds:.1f} s; held-out accuracy "
        f"{result.accuracy_before:.4f} before, {result.accuracy_after:.4f} after defense "
        f"(saved and reloaded); params {rep.params_before:,} → {rep.params_after:,}"
    )
    verdict = "PASS" if result.passed else "FAIL"
    print(
        f"{verdict}: function gap on {result.n_test} held-out digits: max |Δlogit| "
        f"{result.max_abs_diff:.3g}, max relative {result.max_rel_diff:.3g} "
        f"(tolerance {result.tolerance:g}, float32)"
    )
    if attack is not None:
        _print_attack(attack)
    return 0 if result.passed else 1


def _print_attack(attack: Any) -> None:

    rows = [normalize(r) for r in attack.rows]
    label = {
        (None, None): "undefended",
        (1e4, None): "SpecDef α=1e4",
        (1e4, "fuse"): "α=1e4 + informed fuse",
    }
    lrs = sorted({float(r["lr"]) for r in rows})
    table = []
    for key, name in label.items():
        cells: list[Any] = [name]
        for lr in lrs:
            match = [
                r for r in rows if (r.get("alpha"), r.get("adaptive")) == key and r["lr"] == lr
            ]
            r = match[0] if match else {}
            if r.get("steps_to_threshold") is not None:
                cells.append(str(r["steps_to_threshold"]))
            elif r.get("diverged_at") is not None:
                cells.append(f"diverged at {r['diverged_at']}")
            else:
                cells.append(f">{r.get('steps', '?')}" if r else "—")
        cost = next((r.get("cost") for r in rows if r.get("adaptive") and r.get("cost")), None)
        if key[1] and cost:
            cells[0] += f" ({cost['params_added']:+,} params, {cost['params_added_pct']:+.0f} %)"
        table.append(cells)
    print_table(
        "Attack (Adam, mlp-digits on digits 5–9): steps to 90 % held-out harmful accuracy",
        ["model", *(f"lr={lr:g}" for lr in lrs)],
        table,
    )
    print(f"report: {attack.report}  (figure: {', '.join(attack.figures)}; {attack.seconds:.0f} s)")
