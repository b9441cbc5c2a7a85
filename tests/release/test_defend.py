"""The one defend pipeline: the same request defended in memory and by streaming writes the same
tensors, bit for bit, and the same manifest / native record apart from provenance — in both modes,
with either top-k method, on a tiny Llama and a tiny GPT-2 (Conv1D, fused c_attn). Plus the
request's own refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from _tiny import tiny_gpt2, tiny_llama
from specdef.defense.config import SpecDefConfig
from specdef.errors import SpecdefError
from specdef.io.checkpoint import MANIFEST, NATIVE_RECORD
from specdef.release.defend import DefendRequest, DefendResult, defend


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GQA Llama with tied embeddings and a tiny GPT-2, saved as Hugging Face safetensors
    directories."""
    root = tmp_path_factory.mktemp("pipeline")
    tiny_llama(seed=3).save_pretrained(root / "llama")
    tiny_gpt2(seed=3).save_pretrained(root / "gpt2")
    return {"llama": root / "llama", "gpt2": root / "gpt2"}


@pytest.fixture
def source(sources: dict[str, Path]) -> Path:
    return sources["llama"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _record(folder: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest (or native record) without its provenance, and the provenance. The manifest's
    ``integrity`` block hashes the files' bytes (safetensors headers are laid out differently by
    the two writers) and the provenance time, so it is left out with the provenance."""
    data = json.loads((folder / name).read_text())
    data.pop("integrity", None)
    return data, data.pop("provenance")


def _both(
    source: Path, tmp_path: Path, mode: str, config: SpecDefConfig, *, pairs: int = 4
) -> tuple[Path, Path]:
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    results: list[DefendResult] = [
        defend(DefendRequest(str(source), memory, config, mode=mode, probe=False)),
        defend(
            DefendRequest(str(source), streamed, config, mode=mode, streaming=True, probe=False)
        ),
    ]
    in_memory, streaming = results
    assert (in_memory.report is None) == (streaming.report is None) == (mode == "native")
    if mode == "native":
        assert in_memory.pairs == streaming.pairs and len(in_memory.pairs) == pairs
    else:
        assert in_memory.report == streaming.report
    return memory, streamed


# (architecture, linear layers, symmetric pairs): Llama 2 × (q, k, v, o, gate, up, down) and
# 2 × (V/O, up/down); GPT-2 2 × (c_attn, c_proj, c_fc, mlp.c_proj) and 2 × V/O (its GELU MLP has
# no symmetry)
ARCHITECTURES = [("llama", 14, 4), ("gpt2", 8, 2)]


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("mode", ["algorithm1", "native"])
@pytest.mark.parametrize(("arch", "layers", "pairs"), ARCHITECTURES)
def test_in_memory_and_streaming_write_the_same_release(
    sources: dict[str, Path],
    tmp_path: Path,
    arch: str,
    layers: int,
    pairs: int,
    mode: str,
    method: str,
) -> None:
    source = sources[arch]
    config = SpecDefConfig(alpha=1e3, top_k=4, method=method, seed=7)
    memory, streamed = _both(source, tmp_path, mode, config, pairs=pairs)

    a, b = _tensors(memory), _tensors(streamed)
    assert a.keys() == b.keys()
    original = _tensors(source)
    changed = [k for k in a if k not in original or not torch.equal(a[k], original[k])]
    assert changed  # the defense did something …
    for key in a:  # … and both paths did exactly the same thing
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key

    name = MANIFEST if mode == "algorithm1" else NATIVE_RECORD
    (record_a, prov_a), (record_b, prov_b) = _record(memory, name), _record(streamed, name)
    assert record_a == record_b
    assert (prov_a["streaming"], prov_b["streaming"]) == (False, True)
    assert record_a["extra"] == {"source": str(source), "source_kind": "transformers-dir"}
    if mode == "algorithm1":
        rows = record_a["defense"]["layers"]
        assert len(rows) == layers and not record_a["defense"]["forced"]
        assert [e["name"] for e in record_a["structure"]] == [r["name"] for r in rows]
        # the record's spectra are the stored W̃'s (a separate SVD), and with the exact basis
        # σ₁(W̃) = α·σ₁(W) (the randomized basis only approximates the top-k subspace)
        for row in rows:
            stored = a[f"{row['name']}.inflated.weight"].double()
            sigma = float(torch.linalg.svdvals(stored)[0])
            assert sigma == pytest.approx(row["sigma_after"][0], rel=1e-4)
            if method == "exact":
                weight = original[f"{row['name']}.weight"].double()
                weight = weight.T if row["source"] == "conv1d" else weight
                assert sigma == pytest.approx(
                    1e3 * float(torch.linalg.svdvals(weight)[0]), rel=1e-5
                )
    else:
        assert [p["pair"] for p in record_a["pairs"]] and not record_a["forced"]
        assert all(p["product_error"] <= p["tolerance"] for p in record_a["pairs"])


def test_seeds_change_randomized_tensors_in_both_paths(source: Path, tmp_path: Path) -> None:
    """The shared seeding rule is not a constant: another seed gives other randomized bases."""
    one = SpecDefConfig(alpha=1e3, top_k=4, method="randomized", seed=1)
    two = SpecDefConfig(alpha=1e3, top_k=4, method="randomized", seed=2)
    _, first = _both(source, tmp_path / "1", "algorithm1", one)
    _, second = _both(source, tmp_path / "2", "algorithm1", two)
    a, b = _tensors(first), _tensors(second)
    key = "model.layers.0.self_attn.o_proj.inflated.weight"
    assert not torch.equal(a[key], b[key])


def test_the_probe_batch_runs_in_memory(source: Path, tmp_path: Path) -> None:
    config = SpecDefConfig(alpha=1e3, top_k=4)
    result = defend(DefendRequest(str(source), tmp_path / "a1", config))
    assert result.report is not None and result.report.model_output_gap is not None
    assert all(layer.output_gap is not None for layer in result.report.layers)
    native = defend(DefendRequest(str(source), tmp_path / "nat", config, mode="native"))
    assert native.model_output_gap is not None and native.model_output_gap < 5e-2
    record, _ = _record(tmp_path / "nat", NATIVE_RECORD)
    assert record["model_output_gap"] == native.model_output_gap


def test_request_refusals(source: Path, tmp_path: Path) -> None:
    config = SpecDefConfig(alpha=1e3, top_k=4)
    with pytest.raises(SpecdefError, match="Unknown mode 'fast'"):
        DefendRequest(str(source), tmp_path / "o", config, mode="fast")
    with pytest.raises(SpecdefError, match="cannot run the probe batch"):
        DefendRequest(str(source), tmp_path / "o", config, streaming=True)
    with pytest.raises(SpecdefError, match="keeps the source dtype"):
        DefendRequest(str(source), tmp_path / "o", config, streaming=True, probe=False,
                      dtype="bfloat16")  # fmt: skip
    with pytest.raises(SpecdefError, match="Unknown dtype 'float8'"):
        DefendRequest(str(source), tmp_path / "o", config, dtype="float8")
    sampled = SpecDefConfig(alpha=1e3, top_k=4, n_random=2)
    for streaming in (False, True):
        with pytest.raises(SpecdefError, match="n_random=2 applies to Algorithm 1 only"):
            defend(DefendRequest(str(source), tmp_path / "o", sampled, mode="native",
                                 streaming=streaming, probe=False))  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_may_not_touch_the_source(tmp_path: Path, where: str, overwrite: bool) -> None:
    src = tmp_path / "models" / "src"
    tiny_llama().save_pretrained(src)
    before = sorted(p.name for p in src.iterdir())
    out = {"same": src, "inside": src / "defended", "containing": tmp_path / "models"}[where]
    config = SpecDefConfig(alpha=100.0, top_k=2)
    with pytest.raises(SpecdefError, match="the source"):
        DefendRequest(str(src), out, config, overwrite=overwrite)
    assert sorted(p.name for p in src.iterdir()) == before
