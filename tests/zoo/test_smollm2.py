"""SmolLM2-135M-Instruct prepared from its GGUF wheel: a faithful fp32 copy that still knows things.

The first run on a machine converts the GGUF file (≈20–40 s, shared by every later run through the
cache); afterwards each test takes a few seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

from specdef import zoo
from specdef.zoo import _cache, hf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return zoo.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def tokenizer():
    return zoo.load_tokenizer("smollm2-135m")


def test_greedy_answer_names_paris(smollm2, tokenizer):
    ids = torch.tensor([zoo.encode_prompt(tokenizer, "What is the capital of France?")])
    out = smollm2.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
    )
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_conversion_is_faithful(smollm2):
    assert sum(p.numel() for p in smollm2.parameters()) == zoo.model_info("smollm2-135m").params
    assert smollm2.lm_head.weight is smollm2.model.embed_tokens.weight  # tie survived save + load
    cfg = smollm2.config
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    ) == (30, 576, 9, 3)
    assert getattr(cfg, "quantization_config", None) is None
    assert {p.dtype for p in smollm2.parameters()} == {torch.float32}
    manifest = json.loads((hf.smollm2_dir() / _cache.MANIFEST).read_text())
    assert (
        manifest["meta"]["max_abs_logit_diff_vs_gguf"] == 0.0
    )  # checked against the GGUF model at build
    assert manifest["meta"]["tied_embeddings"] is True
    assert "model.safetensors" in manifest["files"]


def test_eager_attention_and_dtype_options(tokenizer):
    model = zoo.load_model("smollm2-135m", attn_implementation="eager", dtype=torch.bfloat16)
    assert model.config._attn_implementation == "eager"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_it_predicts_benign_text_far_better_than_chance(smollm2, tokenizer):
    """A uniform guess over 49152 tokens has loss ln 49152 ≈ 10.8; a real model is far below."""
    chance = float(torch.log(torch.tensor(float(len(tokenizer)))))
    qa = zoo.load_task("benign-qa", tokenizer=tokenizer, max_length=96, eval_limit=2)
    assert qa.evaluate(smollm2, qa.eval_splits()["benign"])["loss"] < 0.3 * chance
    prose = zoo.load_task("benign-text", tokenizer=tokenizer, max_length=96, eval_limit=2)
    assert prose.evaluate(smollm2, prose.eval_splits()["benign-text"])["loss"] < 0.4 * chance


def test_a_truncated_conversion_is_rebuilt_not_used(smollm2, tmp_path):
    """Acceptance: a prepared SmolLM2 cache corrupted mid-way is detected and rebuilt."""
    import shutil

    for sub in ("models", "tokenizers"):
        src = hf.smollm2_dir() if sub == "models" else hf.smollm2_tokenizer_dir()
        shutil.copytree(src, tmp_path / sub / src.name)
    weights = tmp_path / "models" / hf.smollm2_dir().name / "model.safetensors"
    with open(weights, "r+b") as handle:  # as if the copy or the disk failed half-way
        handle.truncate(weights.stat().st_size // 2)
    assert not hf.smollm2_prepared(tmp_path)
    rebuilt = zoo.load_model("smollm2-135m", cache_dir=tmp_path)
    assert hf.smollm2_prepared(tmp_path)
    for (name, a), (_, b) in zip(
        smollm2.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
