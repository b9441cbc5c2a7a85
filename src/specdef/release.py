"""What a model releaser runs: load a source model, defend it, verify the defended checkpoint.

Library side of ``specdef defend`` / ``specdef verify`` (the commands only parse and print).
A *source* is a Hugging Face model directory (safetensors only), a specdef checkpoint directory, or
a model name from :mod:`specdef.zoo`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdef import probe as probing
from specdef.checkpoint import MANIFEST, load_defended, load_tokenizer, model_dtype, save_defended
from specdef.defense import (
    DEFAULT_TOLERANCE,
    DefenseReport,
    SpecDefConfig,
    apply_specdef_,
    defended_layers,
    linear_form,
)
from specdef.errors import SpecdefError, did_you_mean

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Benign English text for probe batches and perplexity (written for specdef; no licence issue).
PROBE_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors may "
    "borrow up to five books at a time, and most loans last three weeks. The reading room on the "
    "second floor is quiet, with large windows that face the river. In winter the staff keep a "
    "pot of tea near the entrance, and children often gather there after school to read."
)
GENERATION_PROMPT = "The capital of France is"


@dataclass
class Source:
    """A loaded model and what is known about it."""

    model: nn.Module
    tokenizer: Any | None
    name: str
    kind: str  # "specdef-checkpoint", "transformers-dir" or "zoo"


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise SpecdefError(did_you_mean(name, DTYPES, what="dtype"))
    return DTYPES[name]


def _load_transformers_dir(root: Path, dtype: torch.dtype | None) -> nn.Module:
    import transformers

    if not any(root.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        raise SpecdefError(
            f"{str(root)!r} has no *.safetensors weights (found: {found}); specdef never unpickles "
            ".bin/.pt files — convert the model to safetensors first."
        )
    config = transformers.AutoConfig.from_pretrained(str(root), trust_remote_code=False)
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
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = sorted(info.get("unexpected_keys") or [])
    if any(".compensation." in key or ".inflated." in key for key in unexpected):
        # a defended checkpoint whose manifest is gone: from_pretrained would silently put
        # random weights where the defended layers were; rebuild the pairs from the weights
        from specdef.detect import load_detected

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
    src: str, *, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> Source:
    """Load ``src``: a specdef checkpoint, a Hugging Face directory, or a zoo model name."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # library code never prints; specdef shows its own progress
    root = Path(src)
    if root.is_dir():
        if (root / MANIFEST).exists():
            model = load_defended(root, attn_implementation=attn_implementation)
            model = model.to(dtype) if dtype is not None else model
            return Source(model, load_tokenizer(root), src, "specdef-checkpoint")
        if (root / "config.json").exists():
            return Source(
                _load_transformers_dir(root, dtype), load_tokenizer(root), src, "transformers-dir"
            )
        raise SpecdefError(
            f"{src!r} is a directory without config.json or {MANIFEST}; pass a Hugging Face model "
            "directory, a specdef checkpoint, or a zoo model name."
        )
    try:
        from specdef import zoo
    except ImportError:  # the zoo is optional for this command
        zoo = None  # type: ignore[assignment]
    names = zoo.model_names() if zoo is not None else []
    if src not in names:
        raise SpecdefError(
            did_you_mean(src, names, what="model")
            + " (or pass a Hugging Face model directory / specdef checkpoint)."
        )
    assert zoo is not None
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return Source(zoo.load_model(src, **kwargs), zoo.load_tokenizer(src), src, "zoo")


def preflight_output(path: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Fail fast (before any heavy work) when ``path`` exists or its folder is not writable."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise SpecdefError(
            f"Output path {str(target)!r} already exists; choose another path or pass --overwrite."
        )
    parent = target.parent if str(target.parent) else Path(".")
    probe_dir = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe_dir = tempfile.mkdtemp(prefix=".specdef-write-test.", dir=parent)
    except OSError as err:
        raise SpecdefError(
            f"Output folder {str(parent)!r} is not writable ({err.strerror}); choose a writable "
            "path with -o."
        ) from None
    finally:
        if probe_dir is not None:
            shutil.rmtree(probe_dir, ignore_errors=True)


def is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None) if config is not None else None


def probe_batch(model: nn.Module, tokenizer: Any | None, *, seed: int = 0) -> probing.Probe:
    """A fixed probe batch for ``model``: the probe text when there is a tokenizer, seeded random
    token ids for a Hugging Face model without one, a seeded Gaussian input otherwise."""
    gen = torch.Generator().manual_seed(seed)
    vocab = _vocab_size(model)
    if vocab is not None:
        if tokenizer is not None:
            ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :64]
            ids = ids % vocab
        else:
            ids = torch.randint(0, vocab, (2, 32), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return torch.randn(_input_shape(model), generator=gen).to(model_dtype(model))


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


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str = PROBE_TEXT) -> float:
    """exp(mean next-token cross-entropy) of ``text`` (≤ 128 tokens)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :128]
    vocab = _vocab_size(model)
    ids = ids % vocab if vocab else ids
    logits = probing.output_tensor(model(input_ids=ids)).double()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(loss.exp())


@torch.no_grad()
def greedy(model: nn.Module, tokenizer: Any, prompt: str = GENERATION_PROMPT, n: int = 16) -> str:
    """``n`` greedily generated tokens after ``prompt``, decoded (plain argmax loop, no cache)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    vocab = _vocab_size(model)
    ids = ids % vocab if vocab else ids
    start = ids.shape[1]
    for _ in range(n):
        logits = probing.output_tensor(model(input_ids=ids))
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return str(tokenizer.decode(ids[0, start:], skip_special_tokens=True))


@dataclass
class Verification:
    """Outcome of :func:`verify`; ``passed`` iff ``max_rel_diff ≤ tolerance``."""

    max_abs_diff: float
    max_rel_diff: float  # max |Δ output| / max |original output|
    rel_fro_diff: float  # ‖Δ output‖_F / ‖original output‖_F
    tolerance: float
    passed: bool
    params_original: int
    params_defended: int
    dtype: str
    spectra: list[dict[str, Any]] = field(default_factory=list)
    perplexity: dict[str, float] | None = None
    generations: dict[str, str] | None = None

    @property
    def overhead(self) -> float:
        return self.params_defended / max(self.params_original, 1) - 1.0

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["overhead"] = self.overhead
        return out


def spectra_rows(original: nn.Module, defended: nn.Module) -> list[dict[str, Any]]:
    """Per defended layer: σ₁ and σ_{k+1} of the original weight and of the stored ``inflated``."""
    rows = []
    for name, layer in defended_layers(defended).items():
        after = torch.linalg.svdvals(layer.inflated.weight.detach().double())
        row: dict[str, Any] = {
            "layer": name,
            "shape": f"{layer.out_features}×{layer.in_features}",
            "top_k": layer.top_k,
            "sigma1_after": float(after[0]),
            "sigma_k1_after": float(after[layer.top_k]) if layer.top_k < len(after) else math.nan,
        }
        try:
            weight = linear_form(original.get_submodule(name))[0]
        except (AttributeError, SpecdefError):
            weight = None
        if weight is not None:
            before = torch.linalg.svdvals(weight.detach().double())
            row["sigma1_before"] = float(before[0])
            row["sigma_k1_before"] = (
                float(before[layer.top_k]) if layer.top_k < len(before) else math.nan
            )
            row["ratio_sigma1"] = row["sigma1_after"] / row["sigma1_before"]
        rows.append(row)
    return rows


def verify(
    original: Source, defended: Source, *, tolerance: float | None = None, seed: int = 0
) -> Verification:
    """Compare ``defended`` with ``original`` on a probe batch (and, for causal LMs with a
    tokenizer, greedy generations and perplexity on the probe text)."""
    tokenizer = defended.tokenizer or original.tokenizer
    batch = probe_batch(original.model, tokenizer, seed=seed)
    ref = probing.model_output(original.model, batch)
    out = probing.model_output(defended.model, batch)
    if ref.shape != out.shape:
        raise SpecdefError(
            f"The two models' outputs differ in shape ({tuple(ref.shape)} vs {tuple(out.shape)}); "
            "is OUT a defended copy of SRC?"
        )
    dtype = model_dtype(defended.model)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, 5e-2)
    max_abs = probing.max_abs_diff(out, ref)
    max_rel = max_abs / max(float(ref.detach().double().abs().max()), 1e-30)
    if not math.isfinite(max_abs):
        max_rel = math.inf
    result = Verification(
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        rel_fro_diff=probing.relative_gap(out, ref),
        tolerance=tol,
        passed=max_rel <= tol,
        params_original=sum(p.numel() for p in original.model.parameters()),
        params_defended=sum(p.numel() for p in defended.model.parameters()),
        dtype=str(dtype).removeprefix("torch."),
        spectra=spectra_rows(original.model, defended.model),
    )
    if tokenizer is not None and is_causal_lm(original.model):
        result.perplexity = {
            "original": perplexity(original.model, tokenizer),
            "defended": perplexity(defended.model, tokenizer),
        }
        result.generations = {
            "prompt": GENERATION_PROMPT,
            "original": greedy(original.model, tokenizer),
            "defended": greedy(defended.model, tokenizer),
        }
    return result


def check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN/Inf parameters (its function is already broken)."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise SpecdefError(
                f"Parameter {name!r} contains NaN or Inf entries; repair the source model before "
                "defending it."
            )


def defend_to(
    src: str,
    out: str | os.PathLike[str],
    config: SpecDefConfig,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> DefenseReport:
    """Load ``src``, defend it with ``config`` (precision guard on a probe batch) and save it to
    ``out`` atomically. Nothing is written when any step fails."""
    preflight_output(out, overwrite=overwrite)
    source = load_source(src, dtype=parse_dtype(dtype))
    check_finite(source.model)
    batch = probe_batch(source.model, source.tokenizer, seed=seed)
    report = apply_specdef_(source.model, config, probe=batch)
    save_defended(
        source.model,
        out,
        report=report,
        tokenizer=source.tokenizer,
        overwrite=overwrite,
        extra={"source": src, "source_kind": source.kind},
    )
    return report
