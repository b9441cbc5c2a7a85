"""Detection without the manifest: exact pairs on tiny Llama, GPT-2 (Conv1D) and an MLP defended with
1, 3 or all linear layers at α ∈ {1e2, 1e4}; nothing on undefended models; robust to renamed and
reordered weights and to raw checkpoint tensors."""

from __future__ import annotations

import copy
import functools
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError
from specdef.informed.detect import (
    DetectConfig,
    compensation_signature,
    detect,
    detect_checkpoint,
    detect_model,
    linear_weights,
)
from specdef.zoo.models import load_model

MODELS = ("tiny-llama", "tiny-gpt2", "mlp-digits")
SELECTIONS = (1, 3, None)  # None: all linear layers
ALPHAS = (1e2, 1e4)


@functools.cache
def _base(name: str) -> nn.Module:
    return load_model(name)


def defended(name: str, selection: int | None, alpha: float) -> nn.Module:
    model = copy.deepcopy(_base(name))
    apply_specdef_(model, SpecDefConfig(alpha=alpha, top_k=4, n_random=selection, seed=7))
    return model


def truth(model: nn.Module) -> set[tuple[str, str]]:
    return {(f"{n}.inflated", f"{n}.compensation") for n in defended_layers(model)}


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("selection", SELECTIONS, ids=["1", "3", "all"])
@pytest.mark.parametrize("name", MODELS)
def test_detect_finds_exactly_the_defended_pairs(name: str, selection: int | None, alpha: float):
    model = defended(name, selection, alpha)
    expected = truth(model)
    assert len(expected) == (selection or len(expected)) and expected
    found = detect_model(model)
    assert {(p.inflated, p.compensation) for p in found.pairs} == expected
    assert not found.suspects and not found.unpaired_compensations
    for pair in found.pairs:
        assert pair.top_k == 4
        assert pair.alpha == pytest.approx(alpha, rel=1e-2)
        assert pair.sigma1_ratio == pytest.approx(alpha, rel=1e-2)
        # the product C·W̃ is the original layer: conditioned like it, α times better than W̃
        assert pair.cond_compensation == pytest.approx(alpha, rel=1e-2)
        assert pair.cond_inflated == pytest.approx(alpha * pair.cond_product, rel=0.05)


@pytest.mark.parametrize("name", MODELS)
def test_no_false_positives_on_undefended_models(name: str):
    found = detect_model(_base(name))
    assert not found.found_anything, found
    assert all(layer.role == "clean" for layer in found.layers)


def test_compensation_signature_matches_an_independent_construction():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64, generator=gen))
    basis = q[:, :5]
    c = torch.eye(48, dtype=torch.float64) + (1 / 300 - 1) * basis @ basis.T
    found = compensation_signature("c", c.float())
    assert found is not None
    sig, got = found
    assert sig.top_k == 5 and sig.alpha == pytest.approx(300, rel=1e-3)
    # same subspace: the projectors agree
    assert torch.allclose(got @ got.T, basis @ basis.T, atol=1e-5)
    # a random square weight, an identity (an injected adapter) and a symmetric but generic one: no
    assert compensation_signature("w", torch.randn(48, 48, generator=gen)) is None
    assert compensation_signature("i", torch.eye(48)) is None
    sym = torch.randn(48, 48, generator=gen)
    assert compensation_signature("s", sym + sym.T) is None


def test_detect_on_renamed_and_shuffled_weights():
    """No module names or order are trusted: the pairs are found from the numbers alone."""
    model = defended("tiny-llama", 3, 1e4)
    weights = linear_weights(model)
    names = list(weights)
    random.Random(0).shuffle(names)
    alias = {n: f"w{i}" for i, n in enumerate(names)}
    renamed = {alias[n]: weights[n] for n in names}
    found = detect(renamed)
    assert {(p.inflated, p.compensation) for p in found.pairs} == {
        (alias[a], alias[b]) for a, b in truth(model)
    }
    assert not found.suspects


def test_detect_on_a_plain_sequence_of_linear_layers():
    """An m×n layer followed by an m×m one, built by hand from an SVD (no DefendedLinear)."""
    torch.manual_seed(0)
    first, second = nn.Linear(32, 24), nn.Linear(24, 10)
    u, _, _ = torch.linalg.svd(first.weight.detach().double())
    proj = u[:, :3] @ u[:, :3].T
    eye = torch.eye(24, dtype=torch.float64)
    inflated = nn.Linear(32, 24, bias=False)
    comp = nn.Linear(24, 24)
    with torch.no_grad():
        inflated.weight.copy_((eye + (1e3 - 1) * proj) @ first.weight.double())
        comp.weight.copy_(eye + (1e-3 - 1) * proj)
        comp.bias.copy_(first.bias)
    seq = nn.Sequential(inflated, comp, nn.ReLU(), second)
    found = detect_model(seq)
    assert [(p.inflated, p.compensation) for p in found.pairs] == [("0", "1")]
    assert found.pairs[0].alpha == pytest.approx(1e3, rel=1e-2)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_detect_checkpoint_without_manifest(tmp_path: Path, name: str):
    """Raw safetensors tensors (a defended dir with its manifest removed / a plain HF dir)."""
    model = defended(name, 3, 1e4)
    save_model(model, str(tmp_path / "model.safetensors"))
    found = detect_checkpoint(tmp_path)
    assert {(p.inflated, p.compensation) for p in found.pairs} == truth(model)
    assert not found.suspects and not found.unpaired_compensations
    plain = tmp_path / "plain"
    plain.mkdir()
    save_model(_base(name), str(plain / "model.safetensors"))  # GPT-2 Conv1D stored n×m
    assert not detect_checkpoint(plain).found_anything


def test_unpaired_inflated_layer_is_a_suspect():
    """A compensation merged elsewhere still leaves the inflated layer's α-sized top gap."""
    model = defended("mlp-digits", 1, 1e4)
    weights = linear_weights(model)
    (comp_name,) = [n for n in weights if n.endswith("compensation")]
    del weights[comp_name]
    found = detect(weights)
    assert not found.pairs
    assert [s.name for s in found.suspects] == [comp_name.replace("compensation", "inflated")]
    assert found.suspects[0].gap_index == 4 and found.suspects[0].gap > 1e3


def test_bad_inputs(tmp_path: Path):
    with pytest.raises(SpecdefError, match="found nothing"):
        detect_checkpoint(tmp_path / "missing")
    with pytest.raises(SpecdefError, match="found none"):
        detect_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(SpecdefError, match="truncated"):
        detect_checkpoint(tmp_path)
    with pytest.raises(SpecdefError, match="alignment_min"):
        DetectConfig(alignment_min=0)


def test_cli_detect_on_a_defended_checkpoint_without_its_manifest(tmp_path: Path, capsys):
    from specdef.cli import main
    from specdef.io.checkpoint import MANIFEST, save_defended

    model = defended("tiny-gpt2", 3, 1e4)
    save_defended(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / MANIFEST).unlink()
    assert main(["detect", str(tmp_path / "ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(p["inflated"], p["compensation"]) for p in out["pairs"]} == truth(model)
    assert main(["detect", "tiny-gpt2"]) == 0
    assert "no sign of SpecDef" in capsys.readouterr().out
    assert main(["detect", "no-such-model"]) == 2


def test_stripped_checkpoint_is_rebuilt_and_fused_from_the_tensors(tmp_path: Path, capsys):
    """A defended HF checkpoint without its manifest: `specdef transform --adaptive fuse` rebuilds
    the pairs from the tensors (not from_pretrained's random init of the missing weights) and writes
    a plain model equal to the original."""
    from specdef.cli import main
    from specdef.informed.detect import load_detected
    from specdef.io.checkpoint import MANIFEST, save_defended
    from specdef.release.sources import load_source

    original = _base("tiny-llama")
    model = defended("tiny-llama", 3, 1e4)
    save_defended(model, tmp_path / "stripped")
    (tmp_path / "stripped" / MANIFEST).unlink()
    rebuilt, found = load_detected(tmp_path / "stripped")
    assert set(defended_layers(rebuilt)) == set(defended_layers(model)) and len(found.pairs) == 3
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = original(input_ids=ids).logits
        assert torch.allclose(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)
    out = tmp_path / "fused"
    assert (
        main(["transform", str(tmp_path / "stripped"), "--adaptive", "fuse", "-o", str(out)]) == 0
    )
    capsys.readouterr()
    card = (out / "README.md").read_text()  # the transform's output says it is not defended
    assert "**This model is not defended.**" in card and "`fuse`" in card
    fused = load_source(str(out)).model
    assert not defended_layers(fused)
    with torch.no_grad():
        gap = (fused(input_ids=ids).logits - ref).abs().max() / ref.abs().max()
    assert float(gap) < 1e-2
