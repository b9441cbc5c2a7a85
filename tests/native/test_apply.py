"""Native deformation: exact symmetries, stock ``from_pretrained`` round trip in a process that never
imports specdef, parameter count unchanged, refusals, rebalance and imbalance detection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from specdef.architectures import MLP
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import DEFAULT_TOLERANCE
from specdef.errors import SpecdefError
from specdef.native.apply import apply_native_, native_imbalance, rebalance_
from specdef.native.pairs import find_symmetric_pairs, read_pair
from specdef.zoo import load_model

ALPHA = 1e4

# Runs in a fresh interpreter: only transformers + torch, never specdef.
_STOCK_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    import transformers
    out = {}
    for folder, auto in json.loads(sys.argv[1]):
        model = getattr(transformers, auto).from_pretrained(folder).eval()
        ids = load_file(folder + "/probe.safetensors")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        save_file({"logits": logits.contiguous()}, folder + "/stock_logits.safetensors")
        out[folder] = sum(p.numel() for p in model.parameters())
    assert not any(m == "specdef" or m.startswith("specdef.") for m in sys.modules), "specdef imported"
    print(json.dumps(out))
    """
)


def _stock_load(jobs: list[tuple[Path, str]]) -> dict[str, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _STOCK_LOADER, json.dumps([(str(f), a) for f, a in jobs])],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: int(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.to(torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max() / b.abs().max())


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_stock_round_trip_tiny_models(tmp_path: Path) -> None:
    """Acceptance 1 on tiny Llama (GQA: 4 query / 2 KV heads), GPT-2 (Conv1D) and BERT."""
    jobs, expected = [], {}
    for name, auto in (
        ("tiny-llama", "AutoModelForCausalLM"),
        ("tiny-gpt2", "AutoModelForCausalLM"),
        ("tiny-bert", "AutoModelForSequenceClassification"),
    ):
        model = load_model(name)
        ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(1))
        before, count = _logits(model, ids), _count(model)
        records = apply_native_(model, SpecDefConfig(alpha=ALPHA, top_k=4))
        assert records and all(r.sigma_max_after > 100 * r.sigma_max_before for r in records)
        after = _logits(model, ids)
        assert _rel(after, before) <= DEFAULT_TOLERANCE[torch.float32]
        folder = tmp_path / name
        model.save_pretrained(folder)
        save_file({"input_ids": ids}, str(folder / "probe.safetensors"))
        jobs.append((folder, auto))
        expected[str(folder)] = (before, after, count)
    counts = _stock_load(jobs)
    for folder, (before, after, count) in expected.items():
        stock = load_file(folder + "/stock_logits.safetensors")["logits"]
        assert counts[folder] == count  # same architecture, no extra parameters
        assert _rel(stock, after) <= 1e-6  # stock loading reproduces the defended model exactly
        assert _rel(stock, before) <= DEFAULT_TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_float64_symmetry_is_exact_and_inflates_top_k(name: str) -> None:
    model = load_model(name, dtype=torch.float64)
    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(2))
    pairs = find_symmetric_pairs(model)
    originals = {p.name: read_pair(model, p) for p in pairs}
    before = _logits(model, ids)
    apply_native_(model, SpecDefConfig(alpha=ALPHA, top_k=3))
    assert _rel(_logits(model, ids), before) <= 1e-9
    for pair in (p for p in pairs if p.kind == "attention"):
        old, new = originals[pair.name].inflated, read_pair(model, pair).inflated
        head_dim = old.shape[0] // pair.kv_heads
        for h in range(pair.kv_heads):
            s_old = torch.linalg.svdvals(old[h * head_dim : (h + 1) * head_dim])
            s_new = torch.linalg.svdvals(new[h * head_dim : (h + 1) * head_dim])
            torch.testing.assert_close(s_new[:3], ALPHA * s_old[:3], rtol=1e-8, atol=0)
            torch.testing.assert_close(s_new[3:], s_old[3:], rtol=1e-8, atol=1e-12)


def test_gqa_pairs_share_the_kv_head_transform() -> None:
    model = load_model("tiny-llama", dtype=torch.float64)
    (pair, *_) = find_symmetric_pairs(model)
    assert (pair.heads, pair.kv_heads) == (4, 2)
    o_before = read_pair(model, pair).compensating
    apply_native_(
        model, SpecDefConfig(alpha=ALPHA, top_k=2, targets=["model.layers.0.self_attn.v_proj"])
    )
    o_after = read_pair(model, pair).compensating
    head_dim = o_before.shape[1] // 4
    # query heads 0 and 1 read KV head 0: the same M⁻¹ maps both
    q0, q1 = (slice(q * head_dim, (q + 1) * head_dim) for q in (0, 1))
    m_inv = torch.linalg.lstsq(o_before[:, q0], o_after[:, q0]).solution
    torch.testing.assert_close(o_before[:, q1] @ m_inv, o_after[:, q1], rtol=1e-7, atol=1e-12)


def test_gated_mlp_diagonal_scales_exactly_top_k_rows() -> None:
    model = load_model("tiny-llama", dtype=torch.float64)
    up_before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    apply_native_(
        model, SpecDefConfig(alpha=ALPHA, top_k=5, targets=["model.layers.0.mlp.up_proj"])
    )
    ratio = model.model.layers[0].mlp.up_proj.weight.detach() / up_before
    row = ratio[:, 0]
    assert int((row - ALPHA).abs().lt(1e-6).sum()) == 5
    assert int((row - 1).abs().lt(1e-12).sum()) == row.numel() - 5
    largest = torch.topk(up_before.norm(dim=1), 5).indices
    assert set(largest.tolist()) == set(torch.nonzero(row > 2).flatten().tolist())


def test_relu_mlp_positive_diagonal_and_overlapping_pairs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(64, (48, 32), 10).double()
    x = torch.randn(20, 64, dtype=torch.float64)
    before, count = model(x), _count(model)
    records = apply_native_(model, SpecDefConfig(alpha=ALPHA, top_k=8))
    assert [r.pair for r in records] == ["layers.0+layers.2", "layers.2+layers.4"]
    torch.testing.assert_close(model(x), before, rtol=1e-9, atol=1e-12)
    assert _count(model) == count
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.st"))
    fresh = MLP(64, (48, 32), 10).double()
    fresh.load_state_dict(load_file(str(tmp_path / "m.st")))  # plain state dict, no new keys
    torch.testing.assert_close(fresh(x), before, rtol=1e-9, atol=1e-12)
    # overlapping pairs: rebalance sweeps to the network's unique balanced point, the same one
    # it reaches from the undefended model
    report = rebalance_(model)
    assert max(after for _, after in report.values()) <= 1e-6
    torch.testing.assert_close(model(x), before, rtol=1e-9, atol=1e-12)
    torch.manual_seed(0)
    original = MLP(64, (48, 32), 10).double()
    rebalance_(original)
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8, msg=name)


def test_refuses_layers_without_symmetry() -> None:
    llama = load_model("tiny-llama")
    snapshot = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(SpecdefError, match=r"'model\.layers\.0\.mlp\.gate_proj'.*has none"):
        apply_native_(llama, SpecDefConfig(alpha=ALPHA, top_k=2, targets="preset:llama"))
    with pytest.raises(SpecdefError, match=r"mlp\.c_fc.*has none.*algorithm1"):
        apply_native_(
            load_model("tiny-gpt2"), SpecDefConfig(alpha=ALPHA, top_k=2, targets=["mlp.c_fc"])
        )
    with pytest.raises(SpecdefError, match="no exact linear symmetry"):
        apply_native_(MLP(8, (8,), 2, activation="tanh"), SpecDefConfig(alpha=ALPHA, top_k=2))
    with pytest.raises(SpecdefError, match="head_dim=16"):
        apply_native_(llama, SpecDefConfig(alpha=ALPHA, top_k=17, targets=["v_proj"]))
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in snapshot.items())


def test_precision_guard_refuses_bf16_and_rolls_back() -> None:
    model = load_model("tiny-llama", dtype=torch.bfloat16)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SpecdefError, match=r"relative error .* > tolerance .*--force"):
        apply_native_(model, SpecDefConfig(alpha=ALPHA, top_k=4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    # a whole-row diagonal keeps each entry's relative rounding: the MLP pairs pass in bf16
    records = apply_native_(model, SpecDefConfig(alpha=ALPHA, top_k=4, targets=["up_proj"]))
    assert max(r.product_error for r in records) < 1e-2


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_rebalance_undoes_the_deformation(name: str) -> None:
    """Balanced form is unique up to an orthogonal factor: rebalancing the defended model and
    rebalancing the original give the same singular values, and the function is unchanged."""
    original = load_model(name, dtype=torch.float64)
    defended = load_model(name, dtype=torch.float64)
    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    before = _logits(original, ids)
    apply_native_(defended, SpecDefConfig(alpha=ALPHA, top_k=3))
    scores = native_imbalance(defended)
    assert min(scores.values()) > 3.5  # ≈ log10(alpha)
    assert max(native_imbalance(original).values()) < 1.0
    report = rebalance_(defended)
    assert all(after < 1e-6 for _, after in report.values())
    rebalance_(original)
    assert _rel(_logits(defended, ids), before) <= 1e-8
    for pair in find_symmetric_pairs(original):
        s_def = torch.linalg.svdvals(read_pair(defended, pair).inflated)
        s_ref = torch.linalg.svdvals(read_pair(original, pair).inflated)
        torch.testing.assert_close(s_def, s_ref, rtol=1e-6, atol=1e-10)


def test_cli_defend_mode_native(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from specdef.cli import main

    out = tmp_path / "nat"
    args = ["defend", "tiny-llama", "-o", str(out), "--alpha", "1e4", "--top-k", "4"]
    assert main([*args, "--mode", "native", "--json"]) == 0
    pairs = json.loads(capsys.readouterr().out)["pairs"]
    assert len(pairs) == 4 and all(p["imbalance_log10"] > 3.5 for p in pairs)
    assert (out / "model.safetensors").exists() and not (out / "specdef_manifest.json").exists()
    bad = tmp_path / "bad"
    assert (
        main([*args[:3], str(bad), *args[4:], "--mode", "native", "--targets", "preset:llama"]) == 2
    )
    assert "gate_proj" in capsys.readouterr().err and not bad.exists()


@pytest.mark.slow
def test_smollm2_native_round_trip(tmp_path: Path) -> None:
    """Acceptance 1 on the real SmolLM2-135M (9 query / 3 KV heads, 30 layers)."""
    model = load_model("smollm2-135m")
    ids = torch.randint(5, 40000, (1, 16), generator=torch.Generator().manual_seed(4))
    before, count = _logits(model, ids), _count(model)
    records = apply_native_(model, SpecDefConfig(alpha=ALPHA, top_k=16, method="randomized"))
    assert len(records) == 60
    assert _rel(_logits(model, ids), before) <= DEFAULT_TOLERANCE[torch.float32]
    model.save_pretrained(tmp_path / "smol")
    save_file({"input_ids": ids}, str(tmp_path / "smol" / "probe.safetensors"))
    del model
    counts = _stock_load([(tmp_path / "smol", "AutoModelForCausalLM")])
    stock = load_file(str(tmp_path / "smol" / "stock_logits.safetensors"))["logits"]
    assert counts[str(tmp_path / "smol")] == count
    assert _rel(stock, before) <= DEFAULT_TOLERANCE[torch.float32]


def test_conv2d_channel_pair_is_exact_and_rebalances() -> None:
    """Conv2d → ReLU → MaxPool → Conv2d: scaling the first conv's output channels (weights and
    bias) by D > 0 and the second's input channels by D⁻¹ leaves the function unchanged (ReLU and
    max-pooling commute with a positive per-channel scale); the top-k channels by norm are × α."""
    model = load_model("cnn-digits").double()
    (pair,) = find_symmetric_pairs(model)
    assert (pair.inflated, pair.compensating, pair.layout) == ("features.0", "features.3", "conv")
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    conv = model.features[0]
    norms = torch.cat([conv.weight.flatten(1), conv.bias[:, None]], 1).norm(dim=1).detach()
    apply_native_(model, SpecDefConfig(alpha=1e3, top_k=4))
    after = torch.cat([conv.weight.flatten(1), conv.bias[:, None]], 1).norm(dim=1).detach()
    ratio = after / norms
    top = norms.argsort(descending=True)[:4]
    assert torch.allclose(ratio[top], torch.full((4,), 1e3, dtype=torch.float64))
    assert torch.allclose(
        ratio[norms.argsort(descending=True)[4:]], torch.ones(12, dtype=torch.float64)
    )
    with torch.no_grad():
        assert float((model(x) - before).abs().max() / before.abs().max()) < 1e-12
    assert native_imbalance(model)[pair.name] > 2
    rebalance_(model)
    assert native_imbalance(model)[pair.name] < 1e-6
    with torch.no_grad():
        assert float((model(x) - before).abs().max() / before.abs().max()) < 1e-12
