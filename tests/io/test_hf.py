"""Algorithm-1 checkpoints load with stock ``from_pretrained`` once specdef is imported, round-trip
through stock ``save_pretrained``, work with peft, and are refused (naming specdef) without it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import specdef  # noqa: F401 - registers model_type "specdef" with transformers' Auto classes
from _tiny import logits, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2, token_batch
from specdef.defense.apply import apply_specdef_, undo_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.errors import SpecdefError
from specdef.io import hf
from specdef.io.checkpoint import load_defended, save_defended

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "qwen2": tiny_qwen2,
    "bert": tiny_bert,
}


def _defended_dir(tmp_path: Path, arch: str) -> tuple[Path, nn.Module]:
    model = BUILDERS[arch]()
    apply_specdef_(model, SpecDefConfig(alpha=1e3, top_k=2, targets="all-linear"))
    out = save_defended(model, tmp_path / arch)
    return out, model


def _auto(arch: str) -> type:
    return AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM


def _out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return logits(model, batch)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_stock_from_pretrained_returns_the_defended_model(tmp_path: Path, arch: str) -> None:
    path, defended = _defended_dir(tmp_path, arch)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == hf.MODEL_TYPE
    assert len(config["specdef"]["structure"]) == len(
        [m for m in defended.modules() if type(m).__name__ == "DefendedLinear"]
    )
    loaded = _auto(arch).from_pretrained(str(path)).eval()
    batch = token_batch()
    # same tensors, same modules: the stock loader reproduces the defended model exactly
    assert torch.equal(_out(loaded, batch), _out(defended.eval(), batch))
    # and the stock round trip keeps it
    loaded.save_pretrained(str(tmp_path / "again"))
    again = _auto(arch).from_pretrained(str(tmp_path / "again")).eval()
    assert torch.equal(_out(again, batch), _out(defended, batch))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_base_model_from_a_head_checkpoint(tmp_path: Path, arch: str) -> None:
    path, defended = _defended_dir(tmp_path, arch)
    base = AutoModel.from_pretrained(str(path)).eval()
    batch = token_batch()
    with torch.no_grad():
        expected = defended.base_model(**batch).last_hidden_state
        assert torch.equal(base(**batch).last_hidden_state, expected)


def test_load_defended_then_stock_save_pretrained_round_trips(tmp_path: Path) -> None:
    path, defended = _defended_dir(tmp_path, "llama")
    model = load_defended(path)
    model.save_pretrained(str(tmp_path / "stock"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "stock")).eval()
    batch = token_batch()
    assert torch.equal(logits(again, batch), logits(defended.eval(), batch))


def test_peft_wraps_the_loaded_model(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    path, defended = _defended_dir(tmp_path, "llama")
    loaded = AutoModelForCausalLM.from_pretrained(str(path))
    wrapped = get_peft_model(loaded, LoraConfig(r=2, target_modules="all-linear"))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".inflated.lora_A" in n for n in trainable)  # peft sees the stock nn.Linear children
    batch = token_batch()
    # LoRA's B starts at zero: the wrapped model computes the defended function
    assert torch.allclose(logits(wrapped, batch), logits(defended.eval(), batch), atol=0, rtol=0)


def test_without_specdef_stock_loading_refuses_and_names_specdef(tmp_path: Path) -> None:
    path, _ = _defended_dir(tmp_path, "llama")
    code = (
        "import sys\n"
        "sys.modules['specdef'] = None  # not importable\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ValueError: The checkpoint you are trying to load has model type `specdef`" in (
        done.stderr
    ), done.stderr[-2000:]


def test_fused_model_saves_a_plain_config_again(tmp_path: Path) -> None:
    path, _ = _defended_dir(tmp_path, "llama")
    model = load_defended(path)
    undo_specdef_(model)
    out = save_defended(model, tmp_path / "fused")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "specdef" not in config
    assert type(AutoModelForCausalLM.from_pretrained(str(out))).__name__ == "LlamaForCausalLM"


def test_a_broken_specdef_block_is_a_one_line_error(tmp_path: Path) -> None:
    path, _ = _defended_dir(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    del config["specdef"]["base_model_type"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecdefError, match="base_model_type"):
        AutoModelForCausalLM.from_pretrained(str(path))
    config["specdef"]["base_model_type"] = "llama"
    config["specdef"]["structure"][0]["name"] = "model.layers.9.mlp.up_proj"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecdefError, match="does not have"):
        AutoModelForCausalLM.from_pretrained(str(path))


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("top_k", 10**6, "top_k"), ("alpha", 0.5, "alpha"), ("shape", None, "shape")],
)
def test_a_bad_config_structure_entry_is_one_line_before_any_layer_is_built(
    tmp_path: Path, field: str, value: object, named: str
) -> None:
    # config.json is the user's file: its 'specdef' layers are checked like the manifest's
    path, _ = _defended_dir(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    entry = config["specdef"]["structure"][0]
    if value is None:
        del entry[field]
    else:
        entry[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecdefError, match=f"'specdef' block: structure\\[0\\].{named}"):
        AutoModelForCausalLM.from_pretrained(str(path))
