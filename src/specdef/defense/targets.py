"""Which layers SpecDef defends: target selection in peft's conventions.

``targets`` is one of

- a tuple of names: a module matches when its full name equals an entry or ends with ``"." + entry``
  (``("gate_proj", "v_proj")`` or ``("model.layers.0.mlp.gate_proj",)``);
- ``"all-linear"``: every ``nn.Linear`` / ``Conv1D``, except a Hugging Face model's output
  embeddings (the LM head, often tied to the input embeddings) or, for a sequence classifier, its
  ``classifier`` / ``score`` head — peft's rule;
- ``"preset:<name>"``: an architecture role preset, e.g. ``"preset:llama"`` = the paper's
  ``gate_proj``, ``v_proj``, ``o_proj`` (see :data:`PRESETS`);
- any other string: a regular expression that must match the whole module name (``re.fullmatch``).

``exclude`` follows the same rules (tuple: names/suffixes; string: regex). ``n_random`` then keeps
``n`` of the matched layers, drawn with a seeded generator and kept in module order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from specdef.defense.layer import DefendedLinear, linear_kinds
from specdef.errors import SpecdefError, did_you_mean

ALL_LINEAR = "all-linear"


PRESET_PREFIX = "preset:"


PRESETS: dict[str, tuple[str, ...]] = {
    # the paper's Llama setting: ≈32 % of the parameters of a Llama model
    "llama": ("gate_proj", "v_proj", "o_proj"),
    "llama-mlp": ("gate_proj", "up_proj", "down_proj"),
    "llama-attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("gate_proj", "v_proj", "o_proj"),
    # GPT-2 analogue of the Llama preset: the value/query/key projection, attention output, MLP in
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc"),
    # BERT analogue: value, attention output, intermediate (MLP in)
    "bert": ("attention.self.value", "attention.output.dense", "intermediate.dense"),
    # specdef.architectures.SmallViT
    "vit": ("attn.v_proj", "attn.o_proj", "up_proj"),
}


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_name_matches(name, key) for key in spec)


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every defendable layer by name, in module order (children of defended layers excluded)."""

    kinds = linear_kinds()
    inside: list[str] = [n for n, m in model.named_modules() if isinstance(m, DefendedLinear)]
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, kinds):
            out[name] = module
    return out


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of a Hugging Face model's output layer (LM head or classification head), which
    "all-linear" skips."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return set()
    try:
        head = getter()
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:
        # peft's rule for sequence classifiers: skip the classification head ("classifier"/"score")
        head = next(
            (
                getattr(model, n)
                for n in ("classifier", "score")
                if isinstance(getattr(model, n, None), nn.Module)
            ),
            None,
        )
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def resolve_preset(targets: str) -> tuple[str, ...]:
    key = targets[len(PRESET_PREFIX) :]
    if key not in PRESETS:
        raise SpecdefError(did_you_mean(key, PRESETS, what="target preset"))
    return PRESETS[key]


def _refuse_unsupported(model: nn.Module, key: str, leaves: Sequence[str]) -> None:
    """Name the type of a module ``key`` matches that SpecDef cannot defend (a Conv2d, a norm …),
    rather than calling it unknown."""
    for name, module in model.named_modules():
        if name and _name_matches(name, key):
            kind = type(module).__name__
            why = (
                " (Algorithm 1 would need its weight reshaped to out × in·k·k and a 1×1 "
                "compensation convolution, which specdef does not implement)"
                if isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d)
                else ""
            )
            raise SpecdefError(
                f"Layer {name!r} is a {kind}, which SpecDef does not defend{why}; it defends "
                f"nn.Linear and Conv1D layers only — name one of: {', '.join(leaves[:40])}."
            )


def select_targets(
    model: nn.Module,
    targets: str | Sequence[str],
    *,
    exclude: str | Sequence[str] = (),
    n_random: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Names of the layers to defend, in module order. Raises :class:`SpecdefError` when nothing
    (or some listed name) matches, listing the available layer names with "did you mean"."""
    layers = candidate_layers(model)
    if not layers:
        already = any(isinstance(m, DefendedLinear) for m in model.modules())
        raise SpecdefError(
            f"No nn.Linear or Conv1D layer left to defend in {type(model).__name__}"
            + ("; every linear layer is already defended." if already else "; SpecDef defends "
               "linear layers only.")
        )  # fmt: skip
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_layer_names(model)
        chosen = [n for n in layers if n not in heads]
        if not chosen:
            raise SpecdefError(
                f"'all-linear' matches no layer of {type(model).__name__} besides its output layer "
                f"({', '.join(sorted(heads))}); name the layers to defend explicitly."
            )
    elif isinstance(targets, str) and targets.startswith(PRESET_PREFIX):
        keys = resolve_preset(targets)
        chosen = [n for n in layers if _matches(n, keys)]
        if not chosen:
            raise SpecdefError(
                f"Preset {targets!r} ({', '.join(keys)}) matches no layer of "
                f"{type(model).__name__}; layer names end in: {', '.join(leaves[:40])}."
            )
    elif isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise SpecdefError(f"Invalid target regex {targets!r}: {err}.") from None
        chosen = [n for n in layers if _matches(n, targets)]
        if not chosen:
            raise SpecdefError(
                f"Target regex {targets!r} matches no linear layer (it must match the whole name, "
                f"e.g. {next(iter(layers))!r}); layer names end in: {', '.join(leaves[:40])}."
            )
    else:
        keys = tuple(targets)
        if not keys:
            raise SpecdefError("Empty target selection; pass layer names, a regex or 'all-linear'.")
        for key in keys:
            if not any(_name_matches(n, key) for n in layers):
                _refuse_unsupported(model, key, leaves)
                raise SpecdefError(
                    did_you_mean(key, [*leaves, *layers][:400], what="target layer")
                    + " (names match exactly or as a dotted suffix; 'all-linear' and "
                    "'preset:NAME' are also accepted)."
                )
        chosen = [n for n in layers if _matches(n, keys)]
    if exclude:
        chosen = [n for n in chosen if not _matches(n, exclude)]
        if not chosen:
            raise SpecdefError(
                f"The exclusions {exclude!r} remove every selected layer; loosen --exclude."
            )
    if n_random is not None:
        if n_random < 1 or n_random > len(chosen):
            raise SpecdefError(
                f"n_random must be in [1, {len(chosen)}] (the number of matched layers), "
                f"found {n_random}."
            )
        gen = torch.Generator().manual_seed(seed)
        keep = set(torch.randperm(len(chosen), generator=gen)[:n_random].tolist())
        chosen = [n for i, n in enumerate(chosen) if i in keep]
    return chosen
