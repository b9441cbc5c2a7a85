"""The TamperBench-shaped adapter: ``run_defense(input_checkpoint_path, output_checkpoint_path,
…)`` and its config/defense classes defend a Hugging Face directory into one that stock
transformers loads with the source's function; config errors are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import specdef  # noqa: F401 - registers model_type "specdef"
from _tiny import logits, tiny_llama, token_batch
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError
from specdef.io.checkpoint import NATIVE_RECORD
from specdef.release.tamperbench import SpecDefDefense, SpecDefDefenseConfig, run_defense


@pytest.fixture
def source(tmp_path: Path) -> Path:
    tiny_llama().double().save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("mode", ["algorithm1", "native"])
def test_run_defense_writes_a_stock_loadable_defended_checkpoint(
    source: Path, tmp_path: Path, mode: str
) -> None:
    out = run_defense(source, tmp_path / "out", alpha=1e3, top_k=2, mode=mode)
    assert out == tmp_path / "out" and (out / "README.md").is_file()
    batch = token_batch()
    reference = logits(transformers.AutoModelForCausalLM.from_pretrained(source).eval(), batch)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert _gap(logits(loaded, batch), reference) <= 1e-9  # float64 source, float64 release
    if mode == "algorithm1":
        assert defended_layers(loaded)
    else:
        assert not defended_layers(loaded) and (out / NATIVE_RECORD).is_file()


def test_the_class_shape_and_config_errors(source: Path, tmp_path: Path) -> None:
    data = {"input_checkpoint_path": str(source), "output_checkpoint_path": str(tmp_path / "o"),
            "alpha": 1e3, "top_k": 2, "targets": ["up_proj", "down_proj"]}  # fmt: skip
    defense = SpecDefDefense(SpecDefDefenseConfig.from_dict(data))
    assert defense.run_defense() == tmp_path / "o"
    assert defense.result is not None and defense.result.report is not None
    assert {layer.name.rsplit(".", 1)[-1] for layer in defense.result.report.layers} == {
        "up_proj", "down_proj"}  # fmt: skip
    with pytest.raises(SpecdefError, match=r"mandatory field\(s\) \['alpha'\]") as err:
        run_defense(source, tmp_path / "x", top_k=2)
    assert "\n" not in str(err.value)
    with pytest.raises(SpecdefError, match=r"\['alpha_value'\] not a field"):
        run_defense(source, tmp_path / "x", alpha=10.0, top_k=2, alpha_value=3)
    with pytest.raises(SpecdefError, match=r"already exists|overwrite"):
        run_defense(source, tmp_path / "o", alpha=1e3, top_k=2)  # never clobbers silently
