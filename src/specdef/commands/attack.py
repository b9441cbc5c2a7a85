"""``specdef attack MODEL --data TASK``: fine-tune a (defended) model over a learning-rate grid and
report the steps each run needed to reach the threshold, the best case and divergence points;
``--search N``: the worst-case attacker (an Optuna search per optimizer); ``--stability-edge``: the
largest learning rate that does not diverge, against the curvature ceiling 2/λ_max."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from specdef import zoo
from specdef.attack.edge import StabilityEdge, edge_row, stability_edge
from specdef.attack.loop import AttackSpec
from specdef.attack.metrics import StepsToThreshold, Threshold, best_over_grid
from specdef.attack.search import (
    PRUNERS,
    SearchConfig,
    SearchSummary,
    compare,
    read_rows,
    run_search,
)
from specdef.attack.sweep import ModelVariant, attack_grid, run_sweep
from specdef.commands.common import add_device_option, add_threads_option, print_json, print_table
from specdef.errors import SpecdefError
from specdef.experiments.config import parse_value
from specdef.informed.transforms import apply_adaptive, parse_adaptive
from specdef.release.sources import load_source
from specdef.tasks import check_compatible
from specdef.utils.files import append_jsonl
from specdef.utils.provenance import provenance, weights_digest


def _listed(text: str, convert: Any, what: str) -> list[Any]:
    try:
        values = [convert(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, found {text!r}")
    return values


def _floats(text: str) -> list[float]:
    return _listed(text, float, "numbers")


def _ints(text: str) -> list[int]:
    return _listed(text, int, "whole numbers")


def _names(text: str) -> list[str]:
    return _listed(text, str.strip, "names")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "attack",
        help="fine-tune a model over a learning-rate grid; steps to threshold per lr",
        description="Run the fine-tuning attack (one training loop, any registered optimizer, "
        "full / untouched-only / LoRA training) for every optimizer × learning rate × seed, and "
        "print the steps each run needed to reach the threshold on the held-out harmful split "
        "(right-censored at --steps), the best learning rate and where runs diverged. With --out, "
        "rows go to RUN_DIR/results.jsonl and a rerun skips finished runs.",
    )
    parser.add_argument("model", metavar="MODEL", help="zoo name, specdef checkpoint or HF dir")
    parser.add_argument(
        "--data",
        required=True,
        metavar="TASK",
        help="zoo task (specdef zoo list), or your own data: jsonl:FILE (prompt/response, text, or features/label records) or dataset:DIR (a saved Hugging Face dataset)",
    )
    parser.add_argument(
        "--optimizer", default="adamw", type=_names, help="name(s), comma-separated"
    )
    parser.add_argument("--lr", default=[1e-5, 1e-4, 1e-3], type=_floats, help="comma-separated")
    parser.add_argument("--steps", type=int, default=100, help="update budget per run")
    parser.add_argument("--seeds", type=_ints, default=[0], help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--schedule", default="constant", help="constant | cosine | linear")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=None)
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 (autocast)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--train", default="all", help="all | untouched (defended layers frozen)")
    parser.add_argument(
        "--lora",
        type=_names,
        default=None,
        metavar="TARGETS",
        help="train peft LoRA adapters on these modules (e.g. q_proj,v_proj or all-linear)",
    )
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument(
        "--threshold",
        default=None,
        help="e.g. harmful_accuracy>=0.9 or harmful_loss<=1.5; a bare number uses the task's "
        "default metric (accuracy for classifiers, loss for language models)",
    )
    parser.add_argument("--stop-at-threshold", action="store_true", help="end runs that reach it")
    parser.add_argument("--divergence-factor", type=float, default=10.0)
    parser.add_argument(
        "--opt-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="optimizer keyword (repeatable), e.g. --opt-arg damping=0.1",
    )
    parser.add_argument(
        "--adaptive",
        default=None,
        metavar="T",
        help="informed attacker: apply a function-preserving transform first — fuse, "
        "inject[:after|before|parallel][:all-linear], factor:J[:freeze], untouched, or "
        "rebalance for a natively defended model (see specdef transform and docs/attacks.md)",
    )
    parser.add_argument("--max-length", type=int, default=128, help="tokens (language tasks)")
    parser.add_argument("--eval-limit", type=int, default=None, help="held-out examples per split")
    parser.add_argument("--out", metavar="RUN_DIR", help="keep results.jsonl here (resumable)")
    parser.add_argument("--json", action="store_true", help="print the rows' summaries as JSON")
    search = parser.add_argument_group(
        "worst-case attacker (docs/attacks.md)",
        "--search N runs an Optuna study per optimizer over lr, warm-up, clipping, weight decay, "
        "schedule and the optimizer's own hyperparameters, minimizing censored steps to "
        "--threshold; it resumes from its storage and several processes can share one.",
    )
    search.add_argument(
        "--search",
        type=int,
        default=None,
        metavar="N",
        help="finished trials per optimizer (replaces the --lr grid)",
    )
    search.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna RDB URL (sqlite:///study.db, postgresql://…) or a journal "
        "file path; default RUN_DIR/study.journal",
    )
    search.add_argument(
        "--study",
        default=None,
        metavar="NAME",
        help="study name prefix (default: derived from model, task and spec)",
    )
    search.add_argument(
        "--pruner",
        default="halving",
        choices=PRUNERS,
        help="successive halving (default), Hyperband, or none",
    )
    search.add_argument(
        "--min-resource",
        type=int,
        default=None,
        metavar="STEPS",
        help="steps before the pruner's first rung (default max(eval, steps/8))",
    )
    search.add_argument("--search-seed", type=int, default=0, help="TPE sampler seed")
    search.add_argument(
        "--lr-range",
        type=_floats,
        default=[1e-12, 1.0],
        metavar="LO,HI",
        help="log-uniform learning-rate range searched (default 1e-12,1)",
    )
    search.add_argument(
        "--warm-start",
        action="store_true",
        help="trial 0 of each study: the optimizer's known-good attack on the undefended "
        "mlp-digits (specdef.attack.search.warm), at this command's batch and steps",
    )
    search.add_argument(
        "--stale-after",
        type=float,
        default=900.0,
        metavar="S",
        help="re-run another host's running trial after S s without heartbeat",
    )
    edge = parser.add_argument_group(
        "stability edge",
        "--stability-edge bisects log(lr) from 2/λ_max (Lanczos on the training loss) down to "
        "1e-12 for the largest rate that does not diverge within --edge-steps, per optimizer.",
    )
    edge.add_argument(
        "--stability-edge",
        action="store_true",
        help="print each optimizer's stability edge and its ratio to 2/λ_max",
    )
    edge.add_argument("--edge-steps", type=int, default=50, help="horizon of each probe")
    edge.add_argument(
        "--edge-tol",
        type=float,
        default=0.05,
        metavar="DECADES",
        help="bisect until the bracket spans this many decades",
    )
    edge.add_argument("--edge-hvps", type=int, default=20, help="Lanczos budget for λ_max")
    edge.add_argument(
        "--edge-batches", type=int, default=1, help="training batches (of --batch-size) for λ_max"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="BASE",
        help="with --search: run the same search on BASE (zoo name, specdef checkpoint or HF "
        "dir) and print, per rung of the threshold ladder, both best steps and the slowdown",
    )
    add_threads_option(parser)
    add_device_option(parser)
    parser.set_defaults(func=run)  # fmt: skip


def _opt_kwargs(items: list[str]) -> dict[str, Any]:

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecdefError(f"Expected --opt-arg KEY=VALUE, found {item!r}; add '=VALUE'.")
        out[key.strip()] = parse_value(value)
    return out


def build_specs(args: argparse.Namespace) -> list[Any]:
    """The attack grid the arguments describe."""

    base = AttackSpec(
        optimizer=args.optimizer[0],
        lr=args.lr[0],
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        optimizer_kwargs=_opt_kwargs(args.opt_arg),
        schedule=args.schedule,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        precision=args.precision,
        eval_every=args.eval_every,
        train="lora" if args.lora else args.train,
        lora_targets=tuple(args.lora) if args.lora else ("all-linear",),
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        divergence_factor=args.divergence_factor,
        threshold=args.threshold,
        stop_at_threshold=args.stop_at_threshold,
    )
    return attack_grid(base, optimizers=args.optimizer, lrs=args.lr, seeds=args.seeds)


def _search_config(args: argparse.Namespace) -> SearchConfig | None:
    if args.search is None:
        return None
    if not args.threshold:
        raise SpecdefError("--search needs --threshold (e.g. harmful_accuracy>=0.75).")
    if len(args.lr_range) != 2:
        raise SpecdefError(f"Expected --lr-range LO,HI (two numbers); found {args.lr_range}.")
    return SearchConfig(
        trials=args.search, storage=args.storage, study=args.study, seed=args.search_seed,
        pruner=args.pruner, min_resource=args.min_resource, lr_low=args.lr_range[0],
        lr_high=args.lr_range[1], stale_after=args.stale_after, warm_start=args.warm_start,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:

    specs = build_specs(args)  # validate the grid before loading anything
    search = _search_config(args)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise SpecdefError(
            f"--out {args.out!r} is a file; --out names a run directory (results.jsonl goes "
            "inside it) — choose a directory path."
        )
    zoo.check_pairing(args.model, args.data)  # before loading either
    if args.baseline:
        zoo.check_pairing(args.baseline, args.data)
    if args.baseline and search is None:
        raise SpecdefError(
            "--baseline compares the searched attacker on both models; add --search N "
            "(and --threshold)."
        )
    variant, specs, task = _load(args.model, args, specs, adaptive=args.adaptive)
    edges: dict[str, StabilityEdge] = {}
    if args.stability_edge:
        edges = _edges(args, task, variant, specs[0])
    if search is not None:
        with contextlib.ExitStack() as stack:
            out = args.out or stack.enter_context(tempfile.TemporaryDirectory())
            found = run_search(task, variant, specs[0], args.optimizer, search, out=out,
                               edges=edges)  # fmt: skip
            if args.baseline:
                return _against_baseline(args, found, variant.name, specs, search, out=out)
        _print_search(found, edges, as_json=args.json)
        return 0
    if args.stability_edge:
        _print_edges(edges, as_json=args.json, model=variant.name, task=task.name)
        return 0
    if args.out:
        summary = run_sweep(task, [variant], specs, results=Path(args.out) / "results.jsonl")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_sweep(task, [variant], specs, results=Path(tmp) / "results.jsonl")
    rows = summary.rows
    if args.json:
        print_json([{k: v for k, v in r.items() if k not in ("history",)} for r in rows])
        return 0
    print_rows(rows, threshold=args.threshold)
    if args.out:
        print(f"{summary.ran} runs now, {summary.skipped} resumed; rows in {summary.results}")
    return 0


def _load(
    ref: str, args: argparse.Namespace, specs: list[Any], *, adaptive: str | None
) -> tuple[ModelVariant, list[Any], Any]:
    """The model ``ref`` as the attacker's variant (after the informed transform ``adaptive``),
    the specs it runs under, and the task tokenized with its own tokenizer."""
    source = load_source(ref, attn_implementation="eager", device=args.device)
    kwargs: dict[str, Any] = {}
    if source.tokenizer is not None:
        kwargs = {"tokenizer": source.tokenizer, "max_length": args.max_length}
        kwargs["eval_limit"] = args.eval_limit
    task = zoo.load_task(args.data, **kwargs)
    check_compatible(source.model, task, model_name=f"model {ref!r}")
    pristine = source.model
    manifest = getattr(pristine, "specdef_manifest", None) or {}
    defense = manifest.get("defense") if isinstance(manifest, dict) else None
    config = (defense or {}).get("config") or {}
    # the weights and the exact data (tokenized with --max-length, cut by --eval-limit) are part of
    # every run id, so a rerun with other options or other weights never resumes stale rows
    info = {
        "alpha": config.get("alpha"),
        "defense": config or None,
        "weights_sha256": weights_digest(pristine),
        "data_sha256": zoo.task_digest(task),
    }
    name = source.name
    if adaptive:
        specs, info = _adaptive(pristine, specs, info, adaptive)
        name = f"{source.name}+{adaptive}"
    return ModelVariant(name, lambda: copy.deepcopy(pristine), info), specs, task


def _against_baseline(
    args: argparse.Namespace,
    found: SearchSummary,
    defended_name: str,
    specs: list[Any],
    search: SearchConfig,
    *,
    out: str,
) -> int:
    """The same search on ``--baseline``; per rung, each model's best trial and the slowdown."""
    base_specs = build_specs(args)
    base, base_specs, base_task = _load(args.baseline, args, base_specs, adaptive=None)
    if base.name == defended_name:
        base = dataclasses.replace(base, name=f"baseline-{base.name}")
    if search.study:
        search = dataclasses.replace(search, study=f"{search.study}-baseline")
    reference = run_search(base_task, base, base_specs[0], args.optimizer, search, out=out)
    threshold = Threshold.parse(specs[0].threshold, task_kind=base_task.kind)
    results = Path(out) / "results.jsonl"
    # read once: the file is large (every trial row holds its history), the rows are per optimizer
    recorded = {r.get("run_id") for r in read_rows(results)} if args.out else set()
    rows = []
    for optimizer in args.optimizer:
        d_rows = [r for r in found.rows if r.get("optimizer") == optimizer]
        b_rows = [r for r in reference.rows if r.get("optimizer") == optimizer]
        row = _comparison_row(args, optimizer, threshold, d_rows, b_rows, found, reference)
        row.update(model=defended_name, baseline=base.name, task=base_task.name)
        rows.append(row)
        if args.out and row["run_id"] not in recorded:
            append_jsonl(results, row)
            recorded.add(row["run_id"])
    if args.json:
        print_json({"comparison": rows, "trials_run_now": found.ran + reference.ran,
                    "storage": found.storage})  # fmt: skip
        return 0
    for row in rows:
        _print_comparison(row)
    print(f"{found.ran + reference.ran} trials run now; study storage {found.storage}")
    return 0


def _comparison_row(
    args: argparse.Namespace,
    optimizer: str,
    threshold: Threshold,
    d_rows: list[dict[str, Any]],
    b_rows: list[dict[str, Any]],
    found: SearchSummary,
    reference: SearchSummary,
) -> dict[str, Any]:
    """One ``baseline-comparison`` row: identity (both studies and their trial rows), the rungs."""
    identity = {
        "studies": [found.studies[optimizer], reference.studies[optimizer]],
        "trials": sorted(str(r["run_id"]) for r in (*d_rows, *b_rows)),
    }
    text = json.dumps(identity, sort_keys=True)
    rid = "cmp-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    metric = threshold.metric
    higher = threshold.higher_is_better
    side = {
        name: {"study": study, "trials": len(compare.trained(rs)),
               "start": compare.start_value(rs, metric),
               "best": compare.best_value(rs, metric, higher_is_better=higher)}
        for name, study, rs in (("defended", identity["studies"][0], d_rows),
                                ("base", identity["studies"][1], b_rows))
    }  # fmt: skip
    return {
        "run_id": rid,
        "experiment": "attack",
        "kind": "baseline-comparison",
        "optimizer": optimizer,
        "threshold": str(threshold),
        "search_trials": args.search,
        "steps": args.steps,
        **side,
        "rungs": [c.to_dict() for c in compare.compare_searches(d_rows, b_rows, threshold)],
        "provenance": provenance(),
    }


def _print_comparison(row: dict[str, Any]) -> None:
    d, b = row["defended"], row["base"]
    table = []
    for rung in row["rungs"]:
        cells = []
        for part in (rung["defended"], rung["base"]):
            outcome = StepsToThreshold.from_dict(part) if "budget" in part else None
            trial = f" (trial {part['trial']})" if part.get("trial") is not None else ""
            cells.append(f"{outcome}{trial}" if outcome is not None else "no trained trial")
        table.append((rung["threshold"], *cells, rung["slowdown_text"]))
    print_table(
        f"{row['model']} vs baseline {row['baseline']} on {row['task']}: {row['optimizer']}, "
        f"best of {d['trials']} / {b['trials']} trained trials of {row['steps']} steps",
        ["rung", "defended best steps", "base best steps", "slowdown"],
        table,
    )
    metric = Threshold.parse(row["threshold"]).metric
    print(
        f"{metric}: defended starts at {d['start']:.4g} (best {d['best']:.4g}), "
        f"base starts at {b['start']:.4g} (best {b['best']:.4g})"
    )


def _edges(
    args: argparse.Namespace, task: Any, variant: ModelVariant, base: AttackSpec
) -> dict[str, StabilityEdge]:
    """Each optimizer's stability edge; with --out also one ``stability-edge`` row each."""
    edges = {}
    for optimizer in args.optimizer:
        spec = dataclasses.replace(base, optimizer=optimizer)
        edge = stability_edge(
            variant.build, task, spec, horizon=args.edge_steps, tol_decades=args.edge_tol,
            hessian_batches=args.edge_batches, max_hvps=args.edge_hvps,
        )  # fmt: skip
        edges[optimizer] = edge
        if args.out:
            _record_edge(Path(args.out) / "results.jsonl", edge, variant, task.name, spec)
    return edges


def _record_edge(
    path: Path, edge: StabilityEdge, variant: ModelVariant, task: str, spec: AttackSpec
) -> None:
    identity = {
        "variant": variant.name,
        "info": dict(variant.info),
        "task": task,
        "spec": spec.to_dict(),
        "horizon": edge.horizon,
        "probes": len(edge.probes),
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    rid = "edge-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    if any(r.get("run_id") == rid for r in read_rows(path)):
        return
    row = edge_row(rid, edge, model=variant.name, task=task, info=variant.info, spec=spec)
    append_jsonl(path, row)


def _print_edges(edges: dict[str, StabilityEdge], *, as_json: bool, model: str, task: str) -> None:
    if as_json:
        print_json({"stability_edge": {k: e.to_dict() for k, e in edges.items()}})
        return
    table = [
        (opt, e.edge if e.edge is not None else f"< {e.lr_min:g}",
         e.diverging if e.diverging is not None else f"none ≤ {e.lr_max:g}",
         e.ceiling.lr, e.ratio if e.ratio is not None else "—", e.ceiling.lambda_max,
         len(e.probes))
        for opt, e in edges.items()
    ]  # fmt: skip
    horizon = next(iter(edges.values())).horizon if edges else 0
    print_table(
        f"stability edge on {model} ({task}): largest lr not diverging within {horizon} steps",
        ["optimizer", "edge (stable)", "diverges at", "2/λ_max", "edge / (2/λ_max)", "λ_max",
         "probes"],
        table,
    )  # fmt: skip
    for opt, e in edges.items():
        print(f"{opt}: {e}")


def _print_search(found: SearchSummary, edges: dict[str, StabilityEdge], *, as_json: bool) -> None:
    rows = [{k: v for k, v in r.items() if k != "history"} for r in found.rows]
    if as_json:
        bests = {k: ({kk: vv for kk, vv in v.items() if kk != "history"} if v else None)
                 for k, v in found.best.items()}  # fmt: skip
        print_json({"rows": rows, "best": bests, "studies": found.studies,
                    "storage": found.storage, "trials_run_now": found.ran,
                    "stability_edge": {k: e.to_dict() for k, e in edges.items()}})  # fmt: skip
        return
    for optimizer, study in found.studies.items():
        table = []
        for r in rows:
            if r["optimizer"] != optimizer:
                continue
            s = r.get("summary") or {}
            reached = str(StepsToThreshold.from_dict(s)) if "budget" in s else r.get("error", "")
            table.append((r["trial"], r["trial_state"], r["params"].get("lr", "—"), reached,
                          r["objective"] if r["objective"] is not None else "—"))  # fmt: skip
        print_table(f"search {study}", ["trial", "state", "lr", "steps to threshold",
                                         "objective"], table)  # fmt: skip
        best = found.best.get(optimizer)
        if best is None:
            print(f"best {optimizer}: no completed trial")
        else:
            outcome = StepsToThreshold.from_dict(best["summary"])
            print(f"best {optimizer}: trial {best['trial']}, {outcome} steps to "
                  f"{best['threshold']}, params {best['params']}")  # fmt: skip
        if optimizer in edges:
            print(f"stability edge {optimizer}: {edges[optimizer]}")
    print(f"{found.ran} trials run now; study storage {found.storage}")


def _adaptive(
    model: Any, specs: list[Any], info: dict[str, Any], transform: str
) -> tuple[list[Any], dict[str, Any]]:
    """Apply the informed transform to ``model`` in place; keep what it froze frozen in every run."""
    parse_adaptive(transform)
    _, record = apply_adaptive(model, transform)
    out = []
    for spec in specs:
        train = record.train if spec.train != "lora" and record.train != "all" else spec.train
        frozen = (*spec.frozen, *record.frozen)
        out.append(dataclasses.replace(spec, frozen=frozen, train=train))
    cost = {k: v for k, v in record.to_dict().items() if k != "frozen"}
    return out, {**info, "adaptive": transform, "cost": cost}


def print_rows(rows: list[dict[str, Any]], *, threshold: str | None) -> None:
    """One table per (optimizer, seed): steps to threshold and divergence per lr, then the best."""

    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["optimizer"]), int(row["seed"])), []).append(row)
    for (optimizer, seed), group in groups.items():
        outcomes: dict[float, StepsToThreshold] = {}
        table = []
        for row in sorted(group, key=lambda r: float(r["lr"])):
            s = row["summary"]
            final = s.get("final", {})
            reached = "—"
            if threshold:
                outcome = StepsToThreshold.from_dict(s)
                outcomes[float(row["lr"])] = outcome
                reached = str(outcome)
            table.append(
                (
                    row["lr"],
                    reached,
                    s["diverged_at"] if s["diverged_at"] is not None else "—",
                    final.get("harmful_accuracy", final.get("harmful_loss", float("nan"))),
                    final.get("benign_loss", float("nan")),
                )
            )
        title = f"{rows[0]['model']} on {rows[0]['task']}: {optimizer}, seed {seed}"
        metric = "harmful acc/loss (last eval)"
        print_table(
            title,
            ["lr", f"steps to {threshold or 'threshold'}", "diverged at", metric, "benign loss"],
            table,
        )
        if threshold:
            lr, best = best_over_grid(outcomes)
            if lr is not None:
                print(f"best: lr={lr:g} reaches {threshold} in {best} steps")
            elif best is not None:
                print(
                    f"best: none of the learning rates reaches {threshold} in {best.budget} steps"
                )
