"""Device check (issue 17): defend → verify → attack → curvature through the CLI on one device, each
step timed, for a machine with a GPU. Prints one line per step and a summary table; the figures go
into docs/benchmarks.md ("Device check") when it has run on a GPU.

    python scripts/device_check.py                       # --device cuda, smollm2-135m on harmful-qa
    python scripts/device_check.py --device cpu --model llama-tiny-benign --steps 5   # plumbing only

Exit status: 0 when every step exits 0 (verify: within the dtype's tolerance), else the first
failing step's; on a machine without CUDA, ``--device cuda`` stops at the first step with the CLI's
one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specdef.cli import main as specdef


def _step(name: str, argv: list[str]) -> tuple[int, float, Any]:
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = specdef(argv)
    seconds = time.perf_counter() - start
    text = out.getvalue()
    try:
        payload = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        payload = None
    print(f"{name:<10} exit {code}  {seconds:8.2f} s", flush=True)
    return code, seconds, payload


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="harmful-qa")
    parser.add_argument("--alpha", default="1e3")
    parser.add_argument("--top-k", default="8")
    parser.add_argument("--steps", default="50")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    common = ["--device", args.device]
    rows: list[tuple[str, int, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "defended")
        defend = ["defend", args.model, "-o", out, "--alpha", args.alpha, "--top-k", args.top_k]
        steps: list[tuple[str, list[str]]] = [
            ("defend", [*defend, "--dtype", args.dtype, "--json", *common]),
            ("verify", ["verify", args.model, out, "--json", *common]),
            ("attack", ["attack", out, "--data", args.data, "--optimizer", "adam", "--lr", "1e-4",
                        "--steps", args.steps, "--batch-size", "8", "--json", *common]),
            ("curvature", ["curvature", out, "--data", args.data, "--batch-size", "8",
                           "--max-hvps", "10", "--no-bounds", "--json", *common]),
        ]  # fmt: skip
        for name, step in steps:
            code, seconds, payload = _step(name, step)
            rows.append((name, code, seconds, _figure(name, payload)))
            if code != 0:
                break
    print(f"\ndevice {args.device}, model {args.model}, data {args.data}, dtype {args.dtype}")
    print("| step | exit | seconds | figure |\n|---|---|---|---|")
    for name, code, seconds, figure in rows:
        print(f"| {name} | {code} | {seconds:.2f} | {figure} |")
    return next((code for _, code, _, _ in rows if code != 0), 0)


def _figure(name: str, payload: Any) -> str:
    """The step's headline figure from its --json output."""
    if not payload:
        return ""
    if name == "defend":
        return f"model output gap {payload.get('model_output_gap')}"
    if name == "verify":
        return f"max relative gap {payload.get('max_rel_diff'):.3g} (tolerance {payload.get('tolerance'):.3g})"
    if name == "attack" and isinstance(payload, list) and payload:
        summary = payload[0].get("summary", {})
        return f"{summary.get('steps_run')} steps in {summary.get('seconds')} s"
    if name == "curvature":
        model = payload.get("model", {})
        return f"λ_max {model.get('eigenvalues', [None])[0]} after {model.get('hvps')} HVPs"
    return ""


if __name__ == "__main__":
    sys.exit(main())
