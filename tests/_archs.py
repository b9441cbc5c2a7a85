"""Tiny randomly initialised models of many architecture families (the holdout matrix of issue 17):
each entry builds a model and an input batch, so defend / reload / detect can be checked per family.
Random weights are fine here: these tests check function preservation and loading, not training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from _tiny import VOCAB, seeded


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


def _hf(config_name: str, model_name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    import transformers

    def make() -> nn.Module:
        config = getattr(transformers, config_name)(**kwargs)
        return getattr(transformers, model_name)(config)

    return lambda: seeded(make, 0)


def _causal(name: str, config_name: str, model_name: str, **kwargs: Any) -> Arch:
    return Arch(name, _hf(config_name, model_name, **kwargs), _lm_batch, "AutoModelForCausalLM")


# the sizes most families share (_DEC: with grouped-query attention, for the Llama-like decoders)
_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
_DEC = {**_BASE, "num_key_value_heads": 2}

ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        _causal("llama", "LlamaConfig", "LlamaForCausalLM", **_DEC),
        _causal("mistral", "MistralConfig", "MistralForCausalLM", **_DEC),
        _causal("qwen2", "Qwen2Config", "Qwen2ForCausalLM", **_DEC),
        _causal("qwen3", "Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **_DEC),
        _causal("gemma", "GemmaConfig", "GemmaForCausalLM", head_dim=8, **_DEC),
        _causal("gemma2", "Gemma2Config", "Gemma2ForCausalLM", head_dim=8, **_DEC),
        _causal("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, **_DEC),
        _causal("phi3", "Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_DEC),
        _causal(
            "gpt2",
            "GPT2Config",
            "GPT2LMHeadModel",
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
        ),
        _causal("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", **_BASE),
        _causal(
            "opt",
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
        _causal(
            "falcon",
            "FalconConfig",
            "FalconForCausalLM",
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        Arch(
            "bert",
            _hf(
                "BertConfig",
                "BertForSequenceClassification",
                **_BASE,
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
                **_BASE,
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
