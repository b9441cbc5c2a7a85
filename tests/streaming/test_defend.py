"""Streaming defense of sharded safetensors checkpoints: same result as the in-memory paths, loads
with ``load_defended`` (Algorithm 1) or stock ``from_pretrained`` (native), one tensor at a time."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from _archs import ARCHS
from _tiny import tiny_llama
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import DEFAULT_TOLERANCE
from specdef.errors import SpecdefError
from specdef.io.checkpoint import INDEX, MANIFEST, bind_manifest, load_defended
from specdef.native.apply import apply_native_
from specdef.streaming import overlap
from specdef.streaming import shards as _stream_io
from specdef.streaming.defend import defend_streaming
from specdef.zoo import load_model

ALPHA = 1e4
READS_ALIVE = 2 * overlap.DEPTH + 2
IDS = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.to(torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _saved(tmp_path: Path, name: str) -> Path:
    model = load_model(name)
    folder = tmp_path / name
    model.save_pretrained(folder, max_shard_size="1MB")  # several shards, HF index
    assert (folder / INDEX).exists()
    return folder


@pytest.fixture
def peak_live_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts how many tensors read from the checkpoint are alive at once."""
    stats = {"live": 0, "peak": 0, "reads": 0}
    original = _stream_io.read_tensor

    def spy(source: _stream_io.Checkpoint, name: str) -> torch.Tensor:
        tensor = original(source, name)
        stats["live"] += 1
        stats["reads"] += 1
        stats["peak"] = max(stats["peak"], stats["live"])
        weakref.finalize(tensor, lambda: stats.__setitem__("live", stats["live"] - 1))
        return tensor

    monkeypatch.setattr(_stream_io, "read_tensor", spy)
    return stats


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_algorithm1_matches_in_memory_and_loads(
    tmp_path: Path, name: str, peak_live_reads: dict[str, int]
) -> None:
    source = _saved(tmp_path, name)
    result = defend_streaming(
        source,
        tmp_path / "out",
        SpecDefConfig(alpha=ALPHA, top_k=4, targets="all-linear", method="exact"),
    )
    # a bounded number of tensors at once: the one transformed, DEPTH read ahead, and (a tensor
    # copied unchanged) DEPTH waiting for the writer plus the one being written
    assert peak_live_reads["reads"] > 0 and peak_live_reads["peak"] <= READS_ALIVE
    reference = load_model(name)
    before = _logits(reference)
    report = apply_specdef_(reference, SpecDefConfig(alpha=ALPHA, top_k=4, method="exact"))
    defended = load_defended(tmp_path / "out")
    assert _rel(_logits(defended), _logits(reference)) <= 1e-6
    assert _rel(_logits(defended), before) <= DEFAULT_TOLERANCE[torch.float32]
    assert sum(p.numel() for p in defended.parameters()) == report.params_after
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert [e["name"] for e in manifest["structure"]] == [r.name for r in report.layers]
    # the shard digests taken from the records (hashed as written) are those of the files on disk
    unbound = {k: v for k, v in manifest.items() if k != "integrity"}
    assert bind_manifest(unbound, tmp_path / "out") == manifest
    index = json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"]
    assert len(index) == result.tensors_out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_native_matches_in_memory_and_loads_stock(
    tmp_path: Path, name: str, peak_live_reads: dict[str, int]
) -> None:
    source = _saved(tmp_path, name)
    defend_streaming(
        source, tmp_path / "out", SpecDefConfig(alpha=ALPHA, top_k=4, method="exact"), mode="native"
    )
    # planning holds one pair (V, its bias, O) at most; rewriting as Algorithm 1 does
    assert peak_live_reads["reads"] > 0 and peak_live_reads["peak"] <= max(3, READS_ALIVE)
    reference = load_model(name)
    before = _logits(reference)
    apply_native_(reference, SpecDefConfig(alpha=ALPHA, top_k=4, method="exact"))
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert _rel(_logits(stock), _logits(reference)) <= 1e-6
    assert _rel(_logits(stock), before) <= DEFAULT_TOLERANCE[torch.float32]
    assert sum(p.numel() for p in stock.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    old = {**_all_tensors(source)}
    new = {**_all_tensors(tmp_path / "out")}
    assert {k: v.shape for k, v in old.items()} == {k: v.shape for k, v in new.items()}


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_randomized_default_preserves_function_with_tied_embeddings(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "src")
    before = _logits(model)
    result = defend_streaming(
        tmp_path / "src", tmp_path / "a1", SpecDefConfig(alpha=ALPHA, top_k=8)
    )
    assert result.tensors_out == result.tensors_in + 14  # 14 layers: + compensation weight each
    loaded = load_defended(tmp_path / "a1")
    assert _rel(_logits(loaded), before) <= DEFAULT_TOLERANCE[torch.float32]
    manifest = json.loads((tmp_path / "a1" / MANIFEST).read_text())
    assert manifest["weights"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    defend_streaming(
        tmp_path / "src", tmp_path / "nat", SpecDefConfig(alpha=ALPHA, top_k=8), mode="native"
    )
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nat").eval()
    assert _rel(_logits(stock), before) <= DEFAULT_TOLERANCE[torch.float32]


def test_shard_writer_is_read_back_by_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "d": torch.randn(2, 2, dtype=torch.float64),
    }
    plan = [(k, _stream_io.CODES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    writer = _stream_io.ShardWriter(tmp_path / "x.safetensors", plan)
    for key, value in tensors.items():
        writer.write(key, value)
    writer.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_bad_inputs_write_nothing(tmp_path: Path) -> None:
    source = _saved(tmp_path, "tiny-llama")
    with pytest.raises(SpecdefError, match=r"with config\.json"):
        defend_streaming(tmp_path / "nowhere", tmp_path / "o1", SpecDefConfig(alpha=ALPHA, top_k=4))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(SpecdefError, match=r"neither model\.safetensors"):
        defend_streaming(tmp_path / "empty", tmp_path / "o1", SpecDefConfig(alpha=ALPHA, top_k=4))
    with pytest.raises(SpecdefError, match="Unknown mode 'fast'"):
        defend_streaming(source, tmp_path / "o2", SpecDefConfig(alpha=ALPHA, top_k=4), mode="fast")
    with pytest.raises(SpecdefError, match="has none"):
        defend_streaming(source, tmp_path / "o3", SpecDefConfig(alpha=ALPHA, top_k=4, targets=("gate_proj",)), mode="native")  # fmt: skip
    with pytest.raises(SpecdefError, match=r"above the tolerance.*--force"):
        defend_streaming(
            source, tmp_path / "o4", SpecDefConfig(alpha=1e9, top_k=4, targets=("v_proj",))
        )
    (tmp_path / "exists").mkdir()
    with pytest.raises(SpecdefError, match="already exists"):
        defend_streaming(source, tmp_path / "exists", SpecDefConfig(alpha=ALPHA, top_k=4))
    shard = sorted(source.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(SpecdefError, match="truncated or corrupt"):
        defend_streaming(source, tmp_path / "o5", SpecDefConfig(alpha=ALPHA, top_k=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exists", "tiny-llama"]


def test_bf16_checkpoint_native_mlp_pairs(tmp_path: Path) -> None:
    """Releases are often bf16: the diagonal MLP symmetry passes the guard there and the written
    shards keep the BF16 dtype; the V/O subspace scaling at α = 1e4 is refused in bf16."""
    model = load_model("tiny-llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    defend_streaming(tmp_path / "src", tmp_path / "out", SpecDefConfig(alpha=ALPHA, top_k=8, targets=("up_proj",)), mode="native")  # fmt: skip
    reference = load_model("tiny-llama", dtype=torch.bfloat16)
    apply_native_(reference, SpecDefConfig(alpha=ALPHA, top_k=8, targets=("up_proj",)))
    written = _all_tensors(tmp_path / "out")
    assert all(v.dtype == torch.bfloat16 for v in written.values())
    for name, param in reference.state_dict().items():
        if name in written:
            assert torch.equal(written[name], param), name
    with pytest.raises(SpecdefError, match="tolerance"):
        defend_streaming(
            tmp_path / "src", tmp_path / "o2", SpecDefConfig(alpha=ALPHA, top_k=8), mode="native"
        )


@pytest.mark.parametrize(
    "entry", ["../../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", "notes.txt"]
)
def test_hostile_shard_index_is_refused_and_writes_nothing(tmp_path: Path, entry: str) -> None:
    import json as _json

    from specdef.cli import main
    from specdef.io.checkpoint import INDEX

    src = tmp_path / "deep" / "src"
    tiny_llama().save_pretrained(src)
    weights = src / "model.safetensors"
    names = list(load_file(str(weights)))
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")}
    index["weight_map"][names[0]] = entry
    (src / INDEX).write_text(_json.dumps(index))
    out = tmp_path / "deep" / "out"
    code = main(
        ["defend", str(src), "-o", str(out), "--alpha", "100", "--top-k", "2", "--streaming"]
    )
    assert code == 2
    assert not out.exists() and not (tmp_path / "x.safetensors").exists()
    assert not any(p.name.startswith(".out") for p in out.parent.iterdir())


@pytest.mark.parametrize("arch", ["phi3", "gpt_neox", "falcon", "opt", "t5"])
def test_native_streaming_of_fused_and_separate_vo_families(tmp_path: Path, arch: str) -> None:
    """The native pairs added for fused QKV (V rows sliced out of qkv_proj / query_key_value, up
    out of gate_up_proj), separate V/out_proj and T5's v/o and ReLU wi/wo: streaming writes the
    tensors the in-memory path computes."""
    model = ARCHS[arch].build().double()
    model.save_pretrained(tmp_path / "src")
    config = SpecDefConfig(alpha=1e3, top_k=2, method="exact")
    defend_streaming(tmp_path / "src", tmp_path / "out", config, mode="native")
    apply_native_(model, config)
    streamed = _all_tensors(tmp_path / "out")
    expected = {k: v for k, v in model.state_dict().items() if k in streamed}  # saved = memory name
    changed = [
        k for k, v in _all_tensors(tmp_path / "src").items() if not torch.equal(v, streamed[k])
    ]
    assert changed and set(changed) <= set(expected)  # the defense did something, on known tensors
    for key in expected:
        assert torch.allclose(streamed[key], expected[key], rtol=1e-12, atol=1e-12), key
