"""Torch threads for the compute commands: wall time of the in-memory randomized defense of SmolLM2-135M
(all linear layers, k = 25, α = 1e4) with 1 and with N threads, alternating, each a fresh child process,
with the 1-minute load average before each run. The evidence behind ``--threads``' default
(``specdef.commands.common.auto_threads``: the cores the load average leaves free).

Prints a table and rewrites the "Torch threads" section of ``docs/benchmarks.md``.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/threads.py`` (≈2–6 min on 2 cores; longer when busy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Torch threads"
COMMAND = "PYTHONPATH=src .venv/bin/python benchmarks/threads.py"

CHILD = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.release.sources import load_source, probe_batch
source = load_source("smollm2-135m")
batch = probe_batch(source.model, source.tokenizer, seed=0)
config = SpecDefConfig(alpha=1e4, top_k=25, targets="all-linear", method="randomized")
start, cpu = time.perf_counter(), time.process_time()
apply_specdef_(source.model, config, probe=batch)
print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}))
"""


def measure(threads: int) -> dict[str, float]:
    load = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads)], env=env, check=True, capture_output=True,
        text=True,
    )  # fmt: skip
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"threads": threads, "load": load, **row}


def render(rows: list[dict[str, float]], many: int) -> str:
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"`{COMMAND}` ({date}; {platform.machine()}, {os.cpu_count()} CPUs). Wall seconds of "
        "`apply_specdef_` (randomized, SmolLM2-135M, all linears, k = 25) in fresh processes, "
        f"1 and {many} torch threads alternating; *load* is the 1-minute load average just before "
        "each run.",
        "",
        "| threads | load | wall s | CPU s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {int(r['threads'])} | {r['load']:.1f} | {r['wall']:.1f} | {r['cpu']:.1f} |"
        for r in rows
    ]
    one = [r["wall"] for r in rows if r["threads"] == 1]
    other = [r["wall"] for r in rows if r["threads"] == many]
    ratio = (sum(other) / len(other)) / (sum(one) / len(one))
    lines += [
        "",
        f"Mean wall time with {many} threads / with 1: **{ratio:.2f}×**. OpenMP threads that share "
        "their cores with other busy processes spin and wait for each other, so on a shared "
        "machine oversubscription costs far more than the extra core gains. Hence the `--threads` "
        "default on every compute command: the cores the 1-minute load average leaves free, at least "
        "1 and at most torch's default (`specdef.commands.common.auto_threads`); pass `--threads N` "
        "to override.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--many", type=int, default=os.cpu_count() or 2, help="the other count")
    parser.add_argument("--pairs", type=int, default=2, help="(1, many) pairs to alternate")
    parser.add_argument("--no-write", action="store_true", help="print only; keep the doc as is")
    args = parser.parse_args()
    rows = []
    for _ in range(args.pairs):
        for threads in (1, args.many):
            rows.append(measure(threads))
            print(rows[-1], flush=True)
    text = render(rows, args.many)
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "src"))
        from specdef.utils.files import replace_markdown_section

        replace_markdown_section(DOC, SECTION, text)
        print(f"wrote the '{SECTION[3:]}' section of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
