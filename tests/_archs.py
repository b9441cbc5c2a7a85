"""Tiny randomly initialised models of many architecture families (the holdout matrix of issue 17):
each entry builds a model and an input batch, so defend / reload / detect can be checked per family.
Random weights are fine here: these tests check function preservation and loading, not training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB = 96


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], dict[str, torch.Tensor]]
    auto: str  # the transformers Auto class that loads it


def _ids(batch: int = 2, length: int = 10, vocab: int = VOCAB) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (batch, length), generator=gen)


def _lm_batch() -> dict[str, torch.Tensor]:
    ids = _ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _seq2seq_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(), "decoder_input_ids": _ids(length=6)}


def _image_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}


def _audio_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "input_features": torch.randn(2, 8, 32, generator=gen),
        "decoder_input_ids": _ids(length=4),
    }


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return make().eval()

    return build


def _hf(config_name: str, model_name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    import transformers

    def make() -> nn.Module:
        config = getattr(transformers, config_name)(**kwargs)
        return getattr(transformers, model_name)(config)

    return _seeded(make)


_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip

ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch(
            "llama",
            _hf("LlamaConfig", "LlamaForCausalLM", **_DEC),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "mistral",
            _hf("MistralConfig", "MistralForCausalLM", **_DEC),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "qwen2",
            _hf("Qwen2Config", "Qwen2ForCausalLM", **_DEC),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "qwen3",
            _hf("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **_DEC),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "gemma",
            _hf("GemmaConfig", "GemmaForCausalLM", head_dim=8, **_DEC),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "gemma2",
            _hf("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, **_DEC),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "gemma3",
            _hf("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, **_DEC),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "phi3",
            _hf("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_DEC),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "gpt2",
            _hf(
                "GPT2Config",
                "GPT2LMHeadModel",
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
            ),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "gpt_neox",
            _hf(
                "GPTNeoXConfig",
                "GPTNeoXForCausalLM",
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            ),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "opt",
            _hf(
                "OPTConfig",
                "OPTForCausalLM",
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            ),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "falcon",
            _hf(
                "FalconConfig",
                "FalconForCausalLM",
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            _lm_batch,
            "AutoModelForCausalLM",
        ),
        Arch(
            "bert",
            _hf(
                "BertConfig",
                "BertForSequenceClassification",
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                num_labels=3,
            ),
            _lm_batch,
            "AutoModelForSequenceClassification",
        ),
        Arch(
            "t5",
            _hf(
                "T5Config",
                "T5ForConditionalGeneration",
                vocab_size=VOCAB,
                d_model=32,
                d_kv=8,
                d_ff=48,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            ),
            _seq2seq_batch,
            "AutoModelForSeq2SeqLM",
        ),
        Arch(
            "vit",
            _hf(
                "ViTConfig",
                "ViTForImageClassification",
                image_size=16,
                patch_size=4,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_labels=3,
            ),
            _image_batch,
            "AutoModelForImageClassification",
        ),
        Arch(
            "clip_text",
            _hf(
                "CLIPTextConfig",
                "CLIPTextModel",
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            ),
            _lm_batch,
            "AutoModel",
        ),
        Arch(
            "whisper",
            _hf(
                "WhisperConfig",
                "WhisperForConditionalGeneration",
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=48,
                decoder_ffn_dim=48,
                num_mel_bins=8,
                max_source_positions=16,
                max_target_positions=32,
                decoder_start_token_id=1,
                pad_token_id=0,
            ),
            _audio_batch,
            "AutoModelForSpeechSeq2Seq",
        ),
    ]
}


def output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits, or the last hidden state)."""
    with torch.no_grad():
        out = model(**batch)
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no logits in {type(out).__name__}")
