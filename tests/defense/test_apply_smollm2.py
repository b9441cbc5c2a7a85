"""The real SmolLM2-135M-Instruct (zoo, fp32): defend at α = 1e4 → save → load in a NEW process →
same logits within the documented fp32 tolerance; the precision guard refuses α = 1e9 in fp32 and
α = 1e4 in bfloat16 with the documented message. (The full 90-layer `preset:llama` figures are in
docs/precision.md, from `benchmarks/precision_table.py`; here 10 of those layers keep it fast.)"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specdef import zoo
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import DEFAULT_TOLERANCE
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError
from specdef.io.checkpoint import save_defended
from specdef.release.sources import probe_batch
from specdef.release.verify import greedy

pytestmark = pytest.mark.slow

FP32_TOL = DEFAULT_TOLERANCE[torch.float32]

_LOADER = """
import sys, torch
from safetensors.torch import load_file, save_file
from specdef.io.checkpoint import load_defended
torch.set_num_threads(1)
model = load_defended(sys.argv[1])
assert model.lm_head.weight is model.model.embed_tokens.weight
batch = load_file(sys.argv[2])
with torch.no_grad():
    save_file({"logits": model(**batch).logits.contiguous()}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = zoo.load_model("smollm2-135m")
    batch = probe_batch(model, zoo.load_tokenizer("smollm2-135m"))
    return model, dict(batch)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return zoo.load_tokenizer("smollm2-135m")


def test_defend_save_load_in_new_process(smollm2, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, batch = smollm2
    with torch.no_grad():
        before = base(**batch).logits
    model = copy.deepcopy(base)
    config = SpecDefConfig(
        alpha=1e4, top_k=25, targets="preset:llama", n_random=10, method="randomized", seed=0
    )
    report = apply_specdef_(model, config, probe=batch)
    assert len(defended_layers(model)) == 10 and not report.forced
    for layer in report.layers:  # top-k inflated by α, the rest kept (manifest spectra, fp32)
        assert layer.sigma_after[0] == pytest.approx(1e4 * layer.sigma_before[0], rel=1e-3)
    with torch.no_grad():
        defended = model(**batch).logits
    save_defended(model, tmp_path / "smol")
    save_file(batch, str(tmp_path / "batch.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", _LOADER, str(tmp_path / "smol"), str(tmp_path / "batch.safetensors"),
         str(tmp_path / "out.safetensors")],
        check=True, env=env, timeout=600,
    )  # fmt: skip
    reloaded = load_file(str(tmp_path / "out.safetensors"))["logits"]
    scale = float(before.abs().max())
    assert float((reloaded - before).abs().max()) / scale < FP32_TOL
    assert float((reloaded - defended).abs().max()) / scale < 1e-6
    # the next-token predictions on the probe text, and a greedy continuation, are unchanged
    assert torch.equal(reloaded.argmax(-1), before.argmax(-1))
    assert greedy(model, tokenizer, n=12) == greedy(base, tokenizer, n=12)


@pytest.mark.parametrize(("dtype", "alpha"), [(torch.float32, 1e9), (torch.bfloat16, 1e4)])
def test_guard_refuses(smollm2, dtype: torch.dtype, alpha: float) -> None:  # type: ignore[no-untyped-def]
    base, batch = smollm2
    model = copy.deepcopy(base).to(dtype)
    config = SpecDefConfig(
        alpha=alpha, top_k=25, targets=("layers.3.mlp.gate_proj", "layers.3.self_attn.o_proj")
    )
    short = str(dtype).removeprefix("torch.")
    with pytest.raises(SpecdefError) as info:
        apply_specdef_(model, config, probe=batch)
    msg = str(info.value)
    assert msg.startswith("Precision guard: layer 'model.layers.3.")
    assert f"in {short} at alpha={alpha:g}, above the tolerance {DEFAULT_TOLERANCE[dtype]:g}" in msg
    assert "the largest alpha that fits" in msg and "--force" in msg
    assert not defended_layers(model)
