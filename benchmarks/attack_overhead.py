"""Attack-harness overhead: steps/s of ``specdef.attack.loop.run_attack`` vs a bare PyTorch loop doing
the same work, measured in the same run.

The model is a small Llama (transformers ``LlamaForCausalLM``: 2 layers, hidden 128, vocabulary 512,
eager attention), the data a fixed set of random token sequences (batch 16 × 64 tokens), the
optimizer AdamW. The bare loop draws the same batches from the same task, runs forward, backward,
``step``, ``zero_grad`` and reads the loss each step, and evaluates at the start and the end as the
harness does. The harness additionally measures the gradient norm and the learning rate, checks for
divergence and keeps its history. Runs alternate (harness, bare, harness, …) after a warm-up so
that drifting machine load hits both alike; the figure is the median of the per-pair ratios.

Target: the harness runs at ≥ 95 % of the bare loop's steps/s. Prints a table and rewrites the
"Attack overhead" section of ``docs/benchmarks.md``; exits 1 when the target is missed.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Attack overhead"
STEPS, PAIRS, THREADS = 40, 6, 1
TARGET = 0.95


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def build_task() -> object:
    from specdef.tasks import CausalLMTask

    gen = torch.Generator().manual_seed(0)

    def examples(n: int) -> list[dict[str, list[int]]]:
        ids = torch.randint(3, 512, (n, 64), generator=gen).tolist()
        return [{"input_ids": row, "labels": row} for row in ids]

    return CausalLMTask("random-tokens", examples(256), {"harmful": examples(32)}, pad_id=0)


def bare_loop(model: torch.nn.Module, task: object, steps: int) -> float:
    """The same work without the harness; returns seconds."""
    start = time.perf_counter()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    stream = task.train_batches(batch_size=16, seed=0)  # type: ignore[attr-defined]
    splits = task.eval_splits()  # type: ignore[attr-defined]
    model.eval()
    task.evaluate(model, splits["harmful"])  # type: ignore[attr-defined]
    model.train()
    for _ in range(steps):
        batch = next(stream)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)  # type: ignore[attr-defined]
        loss.backward()
        opt.step()
        float(loss.detach())
    model.eval()
    task.evaluate(model, splits["harmful"])  # type: ignore[attr-defined]
    return time.perf_counter() - start


def harness(model: torch.nn.Module, task: object, steps: int) -> float:
    from specdef.attack.loop import AttackSpec, run_attack

    spec = AttackSpec(optimizer="adamw", lr=1e-4, steps=steps, batch_size=16, eval_every=steps)
    start = time.perf_counter()
    run_attack(model, task, spec)  # type: ignore[arg-type]
    return time.perf_counter() - start


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from specdef.utils.files import replace_markdown_section

    torch.set_num_threads(THREADS)
    load = os.getloadavg()[0]
    task = build_task()
    harness(build_model(), task, 5)  # warm-up (allocator, kernels, imports)
    bare_loop(build_model(), task, 5)
    pairs = []
    for i in range(PAIRS):  # alternate which loop goes first, so order effects cancel
        if i % 2:
            b = STEPS / bare_loop(build_model(), task, STEPS)
            h = STEPS / harness(build_model(), task, STEPS)
        else:
            h = STEPS / harness(build_model(), task, STEPS)
            b = STEPS / bare_loop(build_model(), task, STEPS)
        pairs.append((h, b))
    ratio = statistics.median(h / b for h, b in pairs)
    h_med = statistics.median(h for h, _ in pairs)
    b_med = statistics.median(b for _, b in pairs)
    holds = ratio >= TARGET
    text = (
        f"{SECTION}\n\n"
        "Steps/s of the attack harness (`specdef.attack.loop.run_attack`) vs a bare PyTorch loop doing "
        f"the same work (`benchmarks/attack_overhead.py`): a 2-layer Llama (hidden 128, vocabulary "
        f"512), batch 16 × 64 tokens, AdamW, {STEPS} steps plus the evaluations at the start and "
        f"the end, {THREADS} thread(s), {PAIRS} pairs (alternating which runs first) after a "
        f"warm-up; load average {load:.1f} on {os.cpu_count()} CPUs at the start.\n\n"
        "| loop | steps/s (median) |\n|---|---|\n"
        f"| bare PyTorch (baseline) | {b_med:.2f} |\n"
        f"| specdef harness | {h_med:.2f} |\n\n"
        f"Harness / bare, median of the per-pair ratios: **{ratio:.3f}** "
        f"(pairs: {', '.join(f'{h / b:.3f}' for h, b in pairs)}). Target ≥ {TARGET}: "
        f"{'met' if holds else '**missed**'}.\n"
    )
    print(text)
    replace_markdown_section(DOC, SECTION, text)
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
