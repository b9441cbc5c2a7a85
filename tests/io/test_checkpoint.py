"""specdef.io.checkpoint: defend → save → load in a NEW process → same logits; manifest contents;
sharding; tied weights; no pickles; one-line errors for damaged checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _tiny import TINY, logits, tiny_llama, token_batch
from specdef.architectures import build_architecture
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import DEFAULT_TOLERANCE
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError
from specdef.io.checkpoint import (
    INDEX,
    MANIFEST,
    WEIGHTS,
    bind_manifest,
    load_defended,
    save_defended,
)

FP32_TOL = DEFAULT_TOLERANCE[torch.float32]  # documented default (docs/precision.md)
ALPHA = 1e4

_LOADER = """
import sys, torch
from safetensors.torch import load_file, save_file
from specdef.io.checkpoint import load_defended
torch.set_num_threads(1)
batch = load_file(sys.argv[1])
out = {}
for i, path in enumerate(sys.argv[3:]):
    model = load_defended(path)
    out[str(i)] = model(**batch).logits.detach().contiguous()
save_file(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Tiny Llama / GPT-2 / BERT defended at α = 1e4, saved, and reloaded by a fresh interpreter."""
    root = tmp_path_factory.mktemp("ckpt")
    batch = token_batch(7)
    cases: dict[str, dict] = {}
    for arch in ("llama", "gpt2", "bert"):
        model = TINY[arch]()
        before = logits(model, batch)
        report = apply_specdef_(model, SpecDefConfig(alpha=ALPHA, top_k=6), probe=batch)
        path = save_defended(
            model, root / arch, max_shard_bytes=200_000 if arch == "llama" else 2**31
        )
        cases[arch] = {
            "before": before,
            "defended": logits(model, batch),
            "path": path,
            "report": report,
        }
    save_file(batch, str(root / "batch.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", _LOADER, str(root / "batch.safetensors"), str(root / "out.safetensors"),
         *(str(cases[a]["path"]) for a in cases)],
        check=True, env=env, timeout=300,
    )  # fmt: skip
    reloaded = load_file(str(root / "out.safetensors"))
    for i, arch in enumerate(cases):
        cases[arch]["reloaded"] = reloaded[str(i)]
    return cases


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_new_process_load_reproduces_the_function(saved: dict[str, dict], arch: str) -> None:
    case = saved[arch]
    before, reloaded = case["before"], case["reloaded"]
    assert float((reloaded - before).abs().max() / before.abs().max()) < FP32_TOL
    # the reload is the very model that was saved, not just a close one
    torch.testing.assert_close(reloaded, case["defended"], rtol=0, atol=1e-6)


def test_manifest_records_the_defense(saved: dict[str, dict]) -> None:
    path = saved["gpt2"]["path"]
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["model"] == {"kind": "transformers", "class": "GPT2LMHeadModel"}
    assert manifest["dtype"] == "float32"
    defense = manifest["defense"]
    assert defense["config"]["alpha"] == ALPHA and defense["config"]["top_k"] == 6
    assert {"git", "versions", "python", "time_utc"} <= set(manifest["provenance"])
    assert len(manifest["structure"]) == len(defense["layers"]) == 8
    for layer in defense["layers"]:
        assert {"name", "shape", "sigma_before", "sigma_after", "reconstruction_error",
                "params_before", "params_after", "dtype"} <= set(layer)  # fmt: skip
        b, a = layer["sigma_before"], layer["sigma_after"]
        assert a[0] == pytest.approx(ALPHA * b[0], rel=1e-4)
        assert a[6] == pytest.approx(b[6], rel=1e-3)
        m, _n = layer["shape"]
        assert layer["params_after"] - layer["params_before"] == m * m
    assert defense["params_after"] - defense["params_before"] == sum(
        ly["shape"][0] ** 2 for ly in defense["layers"]
    )
    assert (path / "config.json").exists() and (path / WEIGHTS).exists()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))


def test_sharded_save_and_tied_weights(saved: dict[str, dict]) -> None:
    path = saved["llama"]["path"]
    index = json.loads((path / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((path / s).exists() for s in shards)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["weights"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    model = load_defended(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(defended_layers(model)) == 14


def test_load_never_unpickles(saved: dict[str, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model = load_defended(saved["bert"]["path"])
    assert len(defended_layers(model)) > 0


def test_architecture_models_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_architecture("mlp", in_features=16, hidden=[24, 24], out_features=5).eval()
    x = torch.randn(4, 16)
    apply_specdef_(model, SpecDefConfig(alpha=1e3, top_k=3, targets=("layers.0", "layers.2")))
    save_defended(model, tmp_path / "mlp")
    manifest = json.loads((tmp_path / "mlp" / MANIFEST).read_text())
    assert manifest["model"]["architecture"]["name"] == "mlp"
    assert not (tmp_path / "mlp" / "config.json").exists()
    reloaded = load_defended(tmp_path / "mlp")
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path: Path) -> None:
    model = tiny_llama().to(torch.bfloat16)
    apply_specdef_(model, SpecDefConfig(alpha=4.0, top_k=2, targets=("o_proj",)))
    save_defended(model, tmp_path / "bf16")
    reloaded = load_defended(tmp_path / "bf16")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    batch = token_batch()
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


# ------------------------------------------------------------------ damaged checkpoints


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_manifest_and_directory(tmp_path: Path, saved: dict[str, dict]) -> None:
    with pytest.raises(SpecdefError, match="Expected a checkpoint directory, found nothing"):
        load_defended(tmp_path / "nope")
    path = _copy(saved["bert"]["path"], tmp_path / "c")
    (path / MANIFEST).unlink()
    with pytest.raises(SpecdefError, match=f"not a specdef checkpoint: {MANIFEST} is missing"):
        load_defended(path)


def test_missing_and_truncated_weights(tmp_path: Path, saved: dict[str, dict]) -> None:
    path = _copy(saved["bert"]["path"], tmp_path / "c")
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        SpecdefError, match=r"does not match the weights: model\.safetensors .*re-save"
    ):
        load_defended(path)
    (path / WEIGHTS).unlink()
    with pytest.raises(SpecdefError, match="is missing; the checkpoint is incomplete"):
        load_defended(path)


def test_manifest_that_does_not_match_the_weights(tmp_path: Path, saved: dict[str, dict]) -> None:
    path = _copy(saved["bert"]["path"], tmp_path / "c")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["structure"] = manifest["structure"][1:]  # one defended layer "forgotten"
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SpecdefError, match=r"was changed after it was written"):
        load_defended(path)  # an edited manifest is refused before anything is built
    # re-bound (as a writer that knew the format would), the structure check still catches it
    (path / MANIFEST).write_text(json.dumps(bind_manifest(manifest, path)))
    with pytest.raises(SpecdefError, match=r"manifest does not match the weights.*unexpected"):
        load_defended(path)
    manifest["structure"] = [{**manifest["structure"][0], "name": "bert.encoder.nope"}]
    (path / MANIFEST).write_text(json.dumps(bind_manifest(manifest, path)))
    with pytest.raises(SpecdefError, match=r"'bert\.encoder\.nope', which the model does not have"):
        load_defended(path)


def _edits() -> list[tuple[str, object]]:
    return [
        ("dtype", "float16"),
        ("params", 1),
        ("extra", {"source": "elsewhere"}),
        ("defense.config.alpha", 1e6),
        ("defense.layers.0.reconstruction_error", 0.0),
        ("structure.0.top_k", 1000000),
        ("provenance.time", "1970-01-01"),
    ]


@pytest.mark.parametrize(("field", "value"), _edits())
def test_any_edited_manifest_field_is_refused(
    tmp_path: Path,
    saved: dict[str, dict],
    field: str,
    value: object,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from specdef.cli import main

    path = _copy(saved["llama"]["path"], tmp_path / "c")
    manifest = json.loads((path / MANIFEST).read_text())
    node = manifest
    *parents, last = field.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SpecdefError, match="was changed after it was written"):
        load_defended(path)
    for command in (
        ["verify", "tiny-llama", str(path)],
        ["attack", str(path), "--data", "harmful-qa", "--steps", "1"],
    ):
        assert main(command) == 2
        assert "was changed after it was written" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["weights", "config"])
def test_any_changed_byte_of_weights_or_config_is_refused(
    tmp_path: Path, saved: dict[str, dict], target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from specdef.cli import main

    path = _copy(saved["gpt2"]["path"], tmp_path / "c")
    name = WEIGHTS if target == "weights" else "config.json"
    data = bytearray((path / name).read_bytes())
    if target == "weights":
        data[-3] ^= 0x01  # one bit of the last tensor's data
    else:
        data = bytearray(data.replace(b'"model_type"', b'"model_type" ', 1))  # still valid JSON
    assert bytes(data) != (saved["gpt2"]["path"] / name).read_bytes()
    (path / name).write_bytes(bytes(data))
    with pytest.raises(SpecdefError, match=f"does not match the weights: {name} expected sha256"):
        load_defended(path)
    assert main(["verify", "tiny-llama", str(path)]) == 2
    assert f"{name} expected sha256" in capsys.readouterr().err
