"""``specdef curvature MODEL --data NAME``: top Hessian eigenvalues, certified lower bounds on σ₁(H)
and the gradient-descent learning-rate ceiling, measured on a few batches of a task."""

from __future__ import annotations

import argparse
import copy
from typing import Any

from specdef import zoo
from specdef.commands.common import add_device_option, add_threads_option, print_json, print_table
from specdef.commands.defend import _selection
from specdef.curvature.lr import predicted_slowdown
from specdef.defense.apply import apply_specdef_
from specdef.defense.certify import measure_curvature
from specdef.defense.config import SpecDefConfig
from specdef.errors import SpecdefError
from specdef.release.sources import load_source
from specdef.tasks import check_compatible


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "curvature",
        help="measure the loss Hessian: top eigenvalues, certified bounds, learning-rate ceiling",
        description="Lanczos on Hessian-vector products (double backward, eager attention) of "
        "the task's loss over a few training batches; for a defended model also the "
        "weight-spectrum bound and a Rayleigh certificate (docs/theory.md). Every reported "
        "eigenvalue is a lower bound on σ₁(H) (Poincaré separation).",
    )
    parser.add_argument("model", metavar="MODEL", help="specdef checkpoint dir or zoo model name")
    parser.add_argument(
        "--data",
        required=True,
        metavar="NAME",
        help="zoo task (specdef zoo list), or your own data: jsonl:FILE (prompt/response, text, or features/label records) or dataset:DIR (a saved Hugging Face dataset)",
    )
    parser.add_argument(
        "--block",
        choices=["all", "compensation", "inflated", "untouched"],
        default="all",
        help="parameters whose Hessian block is measured (default: all)",
    )
    parser.add_argument("--top", type=int, default=1, help="number of top eigenvalues")
    parser.add_argument(
        "--max-hvps", type=int, default=20, help="Lanczos budget in Hessian-vector products"
    )
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative residual")
    parser.add_argument("--batches", type=int, default=1, help="number of batches (default 1)")
    parser.add_argument("--batch-size", type=int, default=2, help="examples per batch")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (LMs)")
    parser.add_argument("--seed", type=int, default=0, help="batch draw and Lanczos start")
    parser.add_argument(
        "--dtype", choices=["float64", "float32"], default="float32", help="compute dtype"
    )
    parser.add_argument(
        "--alpha", type=float, help="defend MODEL in memory first with this alpha (> 1)"
    )
    parser.add_argument("--top-k", type=int, default=1, help="with --alpha: top_k")
    parser.add_argument(
        "--targets", nargs="+", default=["all-linear"], help="with --alpha: layers (see defend)"
    )
    parser.add_argument(
        "--compare", action="store_true", help="with --alpha: also measure the undefended model"
    )
    parser.add_argument(
        "--max-pairs", type=int, default=4, help="defended pairs used by the bounds (largest σ₁(W̃))"
    )
    parser.add_argument(
        "--bound-iters", type=int, default=15, help="Lanczos steps for each pair's κ (activations)"
    )
    parser.add_argument("--no-bounds", action="store_true", help="skip the certified bounds")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_threads_option(parser)
    add_device_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.top < 1 or args.max_hvps < args.top or args.batches < 1 or args.batch_size < 1:
        raise SpecdefError(
            f"Expected --top ≥ 1, --max-hvps ≥ --top, --batches ≥ 1 and --batch-size ≥ 1; found "
            f"{args.top}, {args.max_hvps}, {args.batches}, {args.batch_size}."
        )
    if args.compare and args.alpha is None:
        raise SpecdefError("--compare needs --alpha (the undefended model is MODEL itself).")
    zoo.check_pairing(args.model, args.data)  # before loading either
    dtype = getattr(torch, args.dtype)
    source = load_source(args.model, dtype=dtype, attn_implementation="eager", device=args.device)
    kwargs: dict[str, Any] = {}
    if source.tokenizer is not None:
        kwargs = {"tokenizer": source.tokenizer, "max_length": args.max_length}
    task = zoo.load_task(args.data, **kwargs)
    check_compatible(source.model, task, model_name=f"model {args.model!r}")
    train = getattr(task, "train", None)
    size = len(train[1]) if isinstance(train, tuple) else len(train or [])
    if size == 0:
        raise SpecdefError(
            f"Task {args.data!r} has no training examples at --max-length {args.max_length} "
            "(every prompt fills it); raise --max-length."
        )
    stream = task.train_batches(batch_size=args.batch_size, seed=args.seed)
    batches = [next(stream) for _ in range(args.batches)]
    models = {"model": source.model}
    if args.alpha is not None:
        undefended = source.model
        defended = copy.deepcopy(undefended) if args.compare else undefended
        config = SpecDefConfig(alpha=args.alpha, top_k=args.top_k, targets=_selection(args.targets))
        apply_specdef_(defended, config)
        models = {"undefended": undefended, "defended": defended} if args.compare else {
            "defended": defended}  # fmt: skip
    results: dict[str, Any] = {"model": args.model, "data": args.data, "alpha": args.alpha}
    for label, model in models.items():
        results[label] = measure_curvature(
            model, task.loss, batches, block=args.block, top=args.top, max_hvps=args.max_hvps,
            tol=args.tol, bounds=not args.no_bounds, max_pairs=args.max_pairs,
            bound_iters=args.bound_iters, seed=args.seed,
        )  # fmt: skip
    if args.compare:
        slow = predicted_slowdown(
            results["undefended"]["eigenvalues"][0], results["defended"]["eigenvalues"][0]
        )
        results["predicted_slowdown"] = slow.factor
    if args.json:
        print_json(results)
        return 0
    rows = []
    for label in models:
        r = results[label]
        rows.append([
            label, r["block"], r["parameters"], ", ".join(f"{v:.4g}" for v in r["eigenvalues"]),
            r["hvps"], "yes" if r["converged"] else "no", r["lr_ceiling"],
            r.get("spectral_bound", {}).get("value", "n/a"),
            r.get("certificate", {}).get("value", "n/a"),
        ])  # fmt: skip
    print_table(
        f"Hessian of {args.data} loss ({args.batches}×{args.batch_size}), {args.model}",
        [
            "model",
            "block",
            "params",
            "top λ (Lanczos)",
            "HVPs",
            "converged",
            "GD lr ≤ 2/λ",
            "weight-spectrum bound",
            "certificate",
        ],
        rows,
    )
    if args.compare:
        print(f"predicted GD slowdown (λ_def/λ_undef): {results['predicted_slowdown']:.4g}×")
    return 0
