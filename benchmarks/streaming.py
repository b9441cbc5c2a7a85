"""Streaming defense of sharded checkpoints: peak resident memory and throughput.

Builds synthetic Llama-shaped safetensors checkpoints of ≈1 GB and ≈4 GB (hidden 2048, MLP 5632,
32 query / 4 KV heads, vocab 32000, untied head; random weights, fp32, ≈500 MB shards) in a temporary
folder, then runs, each in its own child process (its ``VmHWM`` is that run's own peak):

- ``copy`` / ``copy again`` (first and last): plain read + write of the same shard files
  (``readinto`` a reused 16 MB buffer, ``write``, fsync);
- ``load+save``: ``safetensors.torch.load_file`` + ``save_file`` per shard (what a script that does
  not stream would do; it holds a whole shard);
- ``algorithm1``: :func:`specdef.streaming.defend.defend_streaming` with the paper's Llama targets
  (``gate_proj``, ``v_proj``, ``o_proj``), α = 1e4, k = 25, randomized top-k;
- ``native``: the same with ``mode="native"`` (every V/O and up/down pair), α = 1e4, k = 25;
- ``idle``: imports torch, transformers and specdef and does nothing (the floor of every run);
- ``algorithm1 profiled`` / ``native profiled`` (1 GB checkpoint only, not in the main table): the
  same runs under ``cProfile``, to split their time into sha256 (the resume records), ``write``,
  ``fsync``, float64/dtype casts, linear algebra (top-k, deform, probe check), building the model
  on the meta device, and the rest.

Every child uses one torch thread (``torch.set_num_threads(1)``). Prints a table and rewrites the "Streaming" section of ``docs/benchmarks.md``. The memory claim
checked (exit 1 otherwise): each streaming mode's peak RSS at 4 GB is within 25 % of its peak at
1 GB — the bound does not grow with the checkpoint.

Run: ``.venv/bin/python benchmarks/streaming.py`` (≈10 min on 1 free core; ≈15 GB of disk).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Streaming"
HIDDEN, MLP, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
SHARD_BYTES = 500 * 1024**2
ALPHA, TOP_K = 1e4, 25
MODES = ("idle", "copy", "load+save", "algorithm1", "native", "copy again")
PROFILED = ("algorithm1 profiled", "native profiled")
# cProfile entries (substrings of "file:function") → the bucket their own time goes to
BUCKETS = {
    "sha256": ("_hashlib.HASH",),
    "write": ("'write' of '_io.BufferedWriter'",),
    "fsync": ("posix.fsync",),
    "casts": ("method 'to' of",),
    "linear algebra": (
        "spectral.py", "_symmetry.py", "_linalg", "_probe_error", "_transform", "isfinite",
        "mul_", "add_", "torch.eye",
    ),
}  # fmt: skip


def _tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = HIDDEN // HEADS
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HEADS * head_dim, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * head_dim)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, MLP)),
        ]
    return [*out, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def make_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """Write a sharded fp32 checkpoint tensor by tensor; returns its size in bytes."""
    import torch
    from transformers import LlamaConfig

    from specdef.streaming.shards import ShardWriter
    from specdef.utils.files import write_json_atomic

    folder.mkdir(parents=True)
    LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(folder)  # fmt: skip
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in _tensors(layers):
        nbytes = 4 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(folder / fname, [(n, "F32", s) for n, s in shard])
        for name, shape in shard:
            if len(shape) == 1:
                tensor = torch.ones(shape)
            else:
                tensor = torch.randn(shape, generator=gen) * (1.0 / math.sqrt(shape[1]))
            writer.write(name, tensor)
            weight_map[name] = fname
            total += tensor.numel() * 4
            del tensor
        writer.close()
    write_json_atomic(
        folder / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def child(mode: str, src: Path, out: Path) -> dict[str, float]:
    """One measured run (in a child process); returns seconds and this process's peak RSS."""
    import torch

    # one thread: on a shared, oversubscribed 2-core machine two threads spin against each other
    torch.set_num_threads(1)
    import transformers  # noqa: F401 - the same import floor for every mode

    from specdef.defense.config import SpecDefConfig
    from specdef.release.defend import DefendRequest, defend

    start = time.perf_counter()
    shards = sorted(src.glob("*.safetensors"))
    if mode in ("copy", "copy again", "load+save"):
        out.mkdir()
        for shard in shards:
            if mode.startswith("copy"):
                _copy(shard, out / shard.name)
            else:
                from safetensors.torch import load_file, save_file

                save_file(load_file(str(shard)), str(out / shard.name))
                with open(out / shard.name, "rb") as handle:
                    os.fsync(handle.fileno())
    else:
        profiler = cProfile.Profile() if mode.endswith("profiled") else None
        if profiler:
            profiler.enable()
        if mode.startswith("algorithm1"):
            config = SpecDefConfig(
                alpha=ALPHA, top_k=TOP_K, targets="preset:llama", method="randomized"
            )
            defend(DefendRequest(str(src), out, config, streaming=True, probe=False))
        elif mode.startswith("native"):
            config = SpecDefConfig(alpha=ALPHA, top_k=TOP_K, method="randomized")
            request = DefendRequest(
                str(src), out, config, mode="native", streaming=True, probe=False
            )
            defend(request)
        if profiler:
            profiler.disable()
            seconds = time.perf_counter() - start
            return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), **_buckets(profiler)}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def _copy(src: Path, dst: Path) -> None:
    """Plain read + write through one reused 16 MB buffer, then fsync. (``shutil.copyfileobj``
    allocates a fresh buffer per read and measured 2-3x slower here: not a fair baseline.)"""
    buffer = bytearray(16 * 1024**2)
    view = memoryview(buffer)
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while count := fin.readinto(buffer):
            done = 0
            while done < count:  # a raw write may be short
                done += fout.write(view[done:count])
        os.fsync(fout.fileno())


def _buckets(profiler: cProfile.Profile) -> dict[str, float]:
    """Own time (s) of the profiled calls, summed per :data:`BUCKETS` entry; the rest in ``other``."""
    out = dict.fromkeys([*BUCKETS, "meta model", "other"], 0.0)
    for (file, _, func), entry in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        label = f"{file}:{func}"
        bucket = next((b for b, keys in BUCKETS.items() if any(k in label for k in keys)), "other")
        out[bucket] += entry[2]
        if label.endswith("streaming.py:_meta_model"):
            out["meta model"] = entry[3]  # cumulative: importing the modeling code, building
    out["other"] = max(0.0, out["other"] - out["meta model"])
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over from
    the parent across fork + exec, so every child would report at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_child(mode: str, src: Path, out: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(src), str(out)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    written = sum(p.stat().st_size for p in out.glob("*.safetensors")) if out.exists() else 0
    result["bytes_out"] = written
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, nargs=2, default=(3, 20),
                        help="decoder layers of the small and large checkpoint (≈1 GB, ≈4 GB)")  # fmt: skip
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    if args.child:
        mode, src, out = args.child
        print(json.dumps(child(mode, Path(src), Path(out))))
        return 0
    work = Path(tempfile.mkdtemp(prefix="specdef-streaming-bench-"))
    rows = []
    try:
        for layers in args.layers:
            src = work / f"ckpt-{layers}"
            size = make_checkpoint(src, layers)
            _warm(src)
            for mode in MODES + (PROFILED if layers == args.layers[0] else ()):
                load = os.getloadavg()[0]
                res = _run_child(mode, src, work / f"out-{mode.replace(' ', '-')}")
                load = (load + os.getloadavg()[0]) / 2
                rows.append({"size_gb": size / 1e9, "mode": mode, "load": load, **res})
                print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = _report(rows)
    print(text)
    if not args.no_doc:
        _write_section(text)
    return 0 if _memory_holds(rows) else 1


def _warm(folder: Path) -> None:
    """Flush the freshly written checkpoint to disk (so no run pays for its writeback) and read
    every shard once, so that all runs start from the same (warm) page cache."""
    os.sync()
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as handle:
            while handle.read(64 * 1024**2):
                pass


def _memory_holds(rows: list[dict[str, Any]]) -> bool:
    by = {(r["mode"], round(r["size_gb"])): r for r in rows}
    sizes = sorted({round(r["size_gb"]) for r in rows})
    return all(
        by[(m, sizes[-1])]["peak_rss_mb"] <= 1.25 * by[(m, sizes[0])]["peak_rss_mb"]
        for m in ("algorithm1", "native")
    )


def _report(rows: list[dict[str, Any]]) -> str:
    idle = {round(r["size_gb"]): r["peak_rss_mb"] for r in rows if r["mode"] == "idle"}
    copy: dict[int, float] = {}  # the fastest plain read + write of each checkpoint
    for r in rows:
        if r["mode"].startswith("copy") or r["mode"] == "load+save":
            key = round(r["size_gb"])
            copy[key] = min(copy.get(key, math.inf), r["seconds"])
    loads = [r["load"] for r in rows]
    lines = [
        SECTION,
        "",
        f"`benchmarks/streaming.py` ({time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"1 torch thread per run; 1-minute load average {min(loads):.1f}–{max(loads):.1f} during "
        "the runs on this shared machine). "
        "Synthetic Llama-shaped fp32 checkpoints (hidden 2048, MLP 5632, 32/4 heads, vocab 32000, "
        "≈500 MB shards; the largest tensor is the 250 MB embedding). Each run is a fresh child "
        "process; *peak RSS* is its `VmHWM`, *idle* the same imports doing nothing. Throughput "
        "= checkpoint bytes read / wall time; *× plain* is relative to the fastest plain read + "
        "write of the same files in this run (`copy`, `copy again` or `load+save`: the same bytes "
        "read and written and fsynced. Here `copy`, a Python read/write loop, was 3–4× slower "
        "than `load+save` in every repetition, cause not found; single writes on this shared "
        "virtual disk also vary up to 10× between repetitions. The fastest is the fair floor). "
        "Every shard is read once "
        "and the page cache flushed (`sync`) before the runs. The streaming "
        "runs include writing the resume records (sha256 of every shard as it is written, fsync "
        "per shard) and building the model on the meta device. *Load*: the "
        "machine's 1-minute load average around the run (CPU-bound streaming suffers more from "
        "load than I/O-bound copying).",
        "",
        "| checkpoint | run | wall s | GB/s | × plain time | peak RSS MB | above idle MB | written GB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = round(r["size_gb"])
        if r["mode"] == "idle" or r["mode"] in PROFILED:
            continue
        lines.append(
            f"| {r['size_gb']:.2f} GB | {r['mode']} | {r['seconds']:.1f} | "
            f"{r['size_gb'] / r['seconds']:.2f} | {r['seconds'] / copy[key]:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - idle[key]:.0f} | "
            f"{r['bytes_out'] / 1e9:.2f} | {r['load']:.1f} |"
        )
    lines += ["", f"Idle floor: {', '.join(f'{v:.0f} MB at {k} GB' for k, v in idle.items())}.", ""]
    holds = _memory_holds(rows)
    lines.append(
        "Memory bound: the streaming peaks at the 4 GB checkpoint are "
        + ("within" if holds else "**not** within")
        + " 25 % of those at 1 GB. What sets them is the largest defended layer's float64 "
        "working set (for Algorithm 1 on `gate_proj` 5632×2048: W and W̃ at 92 MB each, the "
        "5632×5632 compensation at 254 MB, their fp32 casts) plus the largest tensor read (the "
        "250 MB embedding) — not the number of layers or shards. `load+save` holds a whole shard "
        "(≈500 MB here) and grows with the shard size. Algorithm 1 writes more bytes: one m×m "
        "compensation per defended layer."
    )
    profiled = [r for r in rows if r["mode"] in PROFILED]
    if profiled:
        buckets = [*BUCKETS, "meta model", "other"]
        lines += [
            "",
            "Where the streaming time goes (the same runs on the 1 GB checkpoint under `cProfile`, "
            "own time per bucket; *linear algebra* = top-k range finder, deformation, precision "
            "probe; *casts* = float64 ↔ stored dtype; *meta model* = importing the model's "
            "`transformers` code and building it on the meta device (a fixed cost per run); "
            "*other* = reading tensors, Python):",
            "",
            "| run | profiled s | " + " | ".join(buckets) + " |",
            "|---|---|" + "---|" * len(buckets),
        ]
        for r in profiled:
            total = sum(r[b] for b in buckets)
            cells = " | ".join(f"{r[b]:.1f} s ({r[b] / total:.0%})" for b in buckets)
            lines.append(
                f"| {r['mode'].removesuffix(' profiled')} | {r['seconds']:.1f} | {cells} |"
            )
    return "\n".join(lines) + "\n"


def _write_section(text: str) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from specdef.utils.files import replace_markdown_section

    replace_markdown_section(DOC, SECTION, text)


if __name__ == "__main__":
    sys.exit(main())
