"""Sources a releaser defends or verifies: a Hugging Face model directory (safetensors only), a
specdef checkpoint directory, or a model name from :mod:`specdef.zoo`; loading them, dtypes, and
the fixed probe batch every defend and verify path uses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdef import zoo
from specdef.defense import probe as probing
from specdef.defense.layer import linear_form
from specdef.errors import SpecdefError, did_you_mean
from specdef.informed.detect import load_detected
from specdef.io.checkpoint import (
    MANIFEST,
    load_defended,
    load_tokenizer,
    model_dtype,
)
from specdef.io.hf import read_config
from specdef.streaming.shards import check_shapes, open_checkpoint
from specdef.utils.devices import check_dtype, resolve_device

# Benign English text for probe batches and perplexity (written for specdef; no licence issue).
PROBE_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors may "
    "borrow up to five books at a time, and most loans last three weeks. The reading room on the "
    "second floor is quiet, with large windows that face the river. In winter the staff keep a "
    "pot of tea near the entrance, and children often gather there after school to read."
)


@dataclass
class Source:
    """A model loaded into memory and what is known about it (the on-disk, tensor-by-tensor view
    that streaming reads is :class:`specdef.streaming.shards.Checkpoint`)."""

    model: nn.Module
    tokenizer: Any | None
    name: str
    kind: str  # "specdef-checkpoint", "transformers-dir" or "zoo"


def _load_transformers_dir(root: Path, dtype: torch.dtype | None) -> nn.Module:
    import transformers

    if not any(root.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        raise SpecdefError(
            f"{str(root)!r} has no *.safetensors weights (found: {found}); specdef never unpickles "
            ".bin/.pt files — convert the model to safetensors first."
        )
    config = read_config(root)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # mismatches are reported below, as one specdef error
    try:
        model, info = cls.from_pretrained(  # type: ignore[misc]  # returns a pair with loading info
            str(root),
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    except (SafetensorError, OSError) as err:
        raise SpecdefError(
            f"Cannot read the weights in {str(root)!r} ({str(err).splitlines()[0]}); the "
            "safetensors file is missing or truncated."
        ) from None
    except RuntimeError as err:  # a header shape that config.json does not imply
        if "mismatch" not in str(err):
            raise
        with torch.device("meta"):
            expected = cls._from_config(config)  # type: ignore[union-attr]
        check_shapes(open_checkpoint(root), expected)  # names the tensor
        raise SpecdefError(
            f"The weights in {str(root)!r} do not have the shapes its config.json implies; "
            "re-save the checkpoint."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = sorted(info.get("unexpected_keys") or [])
    if any(".compensation." in key or ".inflated." in key for key in unexpected):
        # a defended checkpoint whose manifest is gone: from_pretrained would silently put
        # random weights where the defended layers were; rebuild the pairs from the weights
        detected, _ = load_detected(root)
        return (detected.to(dtype) if dtype is not None else detected).eval()
    missing = sorted(info.get("missing_keys") or [])
    if missing or unexpected:
        raise SpecdefError(
            f"{str(root)!r} does not match its config.json: missing weights "
            f"{missing[:3]}{' …' if len(missing) > 3 else ''}, unexpected weights "
            f"{unexpected[:3]}{' …' if len(unexpected) > 3 else ''}; fix the checkpoint (a "
            "defended checkpoint needs its specdef_manifest.json)."
        )
    return model.eval()


def load_source(
    src: str,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
) -> Source:
    """Load ``src``: a specdef checkpoint, a Hugging Face directory, or a zoo model name; on
    ``device`` when given (``specdef.utils.devices.resolve_device``: ``"auto"``, ``"cuda:1"`` …),
    else on the CPU. Every kind is checked finite (:func:`check_finite`) here, once."""
    source = _load_source(src, dtype=dtype, attn_implementation=attn_implementation)
    if device is not None:
        target = resolve_device(device)
        check_dtype(target, model_dtype(source.model))
        source.model.to(target)
    return source


def _load_source(src: str, *, dtype: torch.dtype | None, attn_implementation: str | None) -> Source:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # library code never prints; specdef shows its own progress
    root = Path(src)
    if root.is_dir():
        if (root / MANIFEST).exists():
            model = load_defended(root, attn_implementation=attn_implementation)
            model = model.to(dtype) if dtype is not None else model
            check_finite(model)
            return Source(model, load_tokenizer(root), src, "specdef-checkpoint")
        if (root / "config.json").exists():
            model = _load_transformers_dir(root, dtype)
            check_finite(model)  # NaN/Inf weights: every later spectrum or loss is undefined
            return Source(model, load_tokenizer(root), src, "transformers-dir")
        raise SpecdefError(
            f"{src!r} is a directory without config.json or {MANIFEST}; pass a Hugging Face model "
            "directory, a specdef checkpoint, or a zoo model name."
        )
    names = zoo.model_names()
    if src not in names:
        raise SpecdefError(
            did_you_mean(src, names, what="model")
            + " (or pass a Hugging Face model directory / specdef checkpoint)."
        )
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = zoo.load_model(src, **kwargs)
    check_finite(model)
    return Source(model, zoo.load_tokenizer(src), src, "zoo")


def is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None) if config is not None else None


def probe_batch(model: nn.Module, tokenizer: Any | None, *, seed: int = 0) -> probing.Probe:
    """A fixed probe batch for ``model``, on the model's device: the probe text when there is a
    tokenizer, seeded random token ids for a Hugging Face text model without one, inputs built
    from the config for the rest (:func:`config_inputs`: speech features, images, the decoder ids
    of an encoder-decoder), a seeded Gaussian input for specdef's own architectures."""
    gen = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    batch: dict[str, torch.Tensor] = {}
    vocab = _vocab_size(model)
    if config is not None:
        batch = config_inputs(config, gen, dtype=model_dtype(model))
    if vocab is not None and not {"input_features", "pixel_values"} & set(batch):
        if tokenizer is not None:
            ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :64]
            ids = ids % vocab
        else:
            ids = torch.randint(0, vocab, (2, 32), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **batch}
    if batch:
        return {k: v.to(model_device(model)) for k, v in batch.items()}
    x = torch.randn(_input_shape(model), generator=gen).to(model_dtype(model))
    return x.to(model_device(model))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def config_inputs(
    config: Any, gen: torch.Generator, *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The inputs a Hugging Face config implies besides ``input_ids``: log-mel features
    (``num_mel_bins`` × 2·``max_source_positions``, Whisper), images (``num_channels`` ×
    ``image_size``², ViT and other vision encoders), and for an encoder-decoder the decoder's ids.
    Empty for a plain text model. Raises :class:`SpecdefError` for an encoder-decoder whose decoder
    vocabulary is unknown."""
    out: dict[str, torch.Tensor] = {}
    mels, frames = (
        getattr(config, "num_mel_bins", None),
        getattr(config, "max_source_positions", None),
    )
    side, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(mels, int) and isinstance(frames, int):
        out["input_features"] = torch.randn(2, mels, 2 * frames, generator=gen).to(dtype)
    elif isinstance(side, int) and isinstance(channels, int):
        out["pixel_values"] = torch.randn(2, channels, side, side, generator=gen).to(dtype)
    if getattr(config, "is_encoder_decoder", False):
        vocab = getattr(config, "vocab_size", None)
        if not isinstance(vocab, int):
            raise SpecdefError(
                f"Cannot build decoder inputs for {type(config).__name__}: its config names no "
                "vocab_size."
            )
        out["decoder_input_ids"] = torch.randint(0, vocab, (2, 8), generator=gen)
    return out


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    arch = getattr(model, "specdef_architecture", None) or {}
    kwargs = arch.get("kwargs", {}) if isinstance(arch, dict) else {}
    name = arch.get("name") if isinstance(arch, dict) else None
    if name in ("cnn", "vit"):
        side = int(kwargs.get("image_size", 8))
        return (16, int(kwargs.get("in_channels", 1)), side, side)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (16, module.in_features)
        if isinstance(module, nn.Conv2d):
            return (16, module.in_channels, 8, 8)
        with contextlib.suppress(SpecdefError):
            weight = linear_form(module)[0]
            return (16, weight.shape[1])
    raise SpecdefError(f"Cannot build a probe input for {type(model).__name__}.")


def check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN/Inf parameters (its function is already broken)."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise SpecdefError(
                f"Parameter {name!r} contains NaN or Inf entries; repair the source model before "
                "defending, attacking or transforming it."
            )
