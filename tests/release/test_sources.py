"""specdef.release.sources: a Hugging Face directory, a specdef checkpoint and a zoo name load as the
function they hold (checked against the model that was saved, or the zoo's own loader), with
one-line errors for what cannot be loaded; the probe batch is fixed by its seed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from _tiny import VOCAB, logits, tiny_llama, token_batch
from specdef import zoo
from specdef.architectures import build_architecture
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError
from specdef.io.checkpoint import MANIFEST, WEIGHTS, save_defended
from specdef.release.sources import (
    PROBE_TEXT,
    check_finite,
    load_source,
    probe_batch,
)
from specdef.utils.dtypes import parse_dtype


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    return path


def _refused(match: str, src: str, **kwargs: object) -> str:
    with pytest.raises(SpecdefError, match=match) as info:
        load_source(src, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_hugging_face_directory_loads_the_saved_function(hf_dir: Path) -> None:
    source = load_source(str(hf_dir))
    assert (source.kind, source.name, source.tokenizer) == ("transformers-dir", str(hf_dir), None)
    assert not source.model.training
    batch = token_batch()
    torch.testing.assert_close(
        logits(source.model, batch), logits(tiny_llama(), batch), rtol=0, atol=0
    )
    narrow = load_source(str(hf_dir), dtype=torch.bfloat16).model
    assert {p.dtype for p in narrow.parameters()} == {torch.bfloat16}


def test_a_specdef_checkpoint_loads_its_defended_structure(tmp_path: Path) -> None:
    model = tiny_llama()
    apply_specdef_(model, SpecDefConfig(alpha=1e3, top_k=4, targets="preset:llama"))
    save_defended(model, tmp_path / "ckpt")
    source = load_source(str(tmp_path / "ckpt"))
    assert source.kind == "specdef-checkpoint"
    assert list(defended_layers(source.model)) == list(defended_layers(model))
    saved, loaded = model.state_dict(), source.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    batch = token_batch()
    torch.testing.assert_close(logits(source.model, batch), logits(model, batch), rtol=0, atol=0)


def test_a_zoo_name_loads_the_zoo_model_and_its_tokenizer() -> None:
    source = load_source("tiny-llama")
    assert source.kind == "zoo" and source.tokenizer is not None
    reference = zoo.load_model("tiny-llama", dtype=torch.float32).state_dict()
    state = source.model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_a_defended_dir_without_its_manifest_is_rebuilt_not_randomly_filled(tmp_path: Path) -> None:
    """from_pretrained alone would put random weights where the defended layers were."""
    model = zoo.load_model("tiny-llama")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        before = model(ids).logits
    apply_specdef_(model, SpecDefConfig(alpha=1e2, top_k=2, targets="preset:llama"))
    save_defended(model, tmp_path / "d")
    (tmp_path / "d" / MANIFEST).unlink()
    loaded = load_source(str(tmp_path / "d")).model
    assert len(defended_layers(loaded)) == len(defended_layers(model))
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.allclose(after, before, atol=1e-3, rtol=1e-3)


def test_one_line_errors(hf_dir: Path, tmp_path: Path) -> None:
    bare = Path(shutil.copytree(hf_dir, tmp_path / "bare"))
    (bare / WEIGHTS).unlink()
    msg = _refused(r"has no \*\.safetensors weights \(found: config\.json", str(bare))
    assert "never unpickles" in msg
    truncated = Path(shutil.copytree(hf_dir, tmp_path / "truncated"))
    data = (truncated / WEIGHTS).read_bytes()
    (truncated / WEIGHTS).write_bytes(data[: len(data) // 3])
    _refused("the safetensors file is missing or truncated", str(truncated))
    _refused(r"Unknown model 'tiny-lama'\. Did you mean: tiny-llama", "tiny-lama")
    (tmp_path / "empty").mkdir()
    _refused(f"is a directory without config.json or {MANIFEST}", str(tmp_path / "empty"))
    with pytest.raises(SpecdefError, match=r"Unknown dtype 'float33'\. Did you mean: float32"):
        parse_dtype("float33")
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(None) is None


def test_check_finite_names_the_broken_parameter() -> None:
    model = tiny_llama()
    check_finite(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[2, 3] = float("nan")
    with pytest.raises(
        SpecdefError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' contains NaN"
    ):
        check_finite(model)


def test_probe_batches_are_fixed_by_their_seed() -> None:
    model = tiny_llama()
    batch = probe_batch(model, None, seed=3)
    assert isinstance(batch, dict) and batch["input_ids"].shape == (2, 32)
    assert torch.equal(batch["input_ids"], probe_batch(model, None, seed=3)["input_ids"])  # type: ignore[index]
    assert not torch.equal(batch["input_ids"], probe_batch(model, None, seed=4)["input_ids"])  # type: ignore[index]
    assert int(batch["input_ids"].min()) >= 0 and int(batch["input_ids"].max()) < VOCAB
    assert torch.equal(batch["attention_mask"], torch.ones(2, 32, dtype=torch.long))
    tokenizer = zoo.load_tokenizer("tiny-llama")
    text = probe_batch(model, tokenizer)["input_ids"]  # type: ignore[index]
    expected = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :64] % VOCAB
    assert torch.equal(text, expected)
    mlp = build_architecture("mlp", in_features=12, hidden=[8], out_features=3).double()
    gaussian = probe_batch(mlp, None, seed=1)
    assert isinstance(gaussian, torch.Tensor) and gaussian.shape == (16, 12)
    assert gaussian.dtype == torch.float64
    assert torch.equal(gaussian, probe_batch(mlp, None, seed=1))  # type: ignore[arg-type]
