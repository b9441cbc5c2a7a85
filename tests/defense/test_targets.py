"""specdef.defense.targets: which layers SpecDef defends, in peft's conventions (names and dotted
suffixes, regex full match, "all-linear" without the LM / classifier head, presets, exclude,
seeded n_random), each checked against a plain loop over ``named_modules``; did-you-mean errors."""

from __future__ import annotations

import re

import pytest
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification
from transformers.pytorch_utils import Conv1D

from _tiny import TINY, VOCAB, tiny_llama
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.targets import PRESETS, select_targets
from specdef.errors import SpecdefError

HEADS = {"lm_head", "classifier", "score"}  # peft's output layers, by their Hugging Face names


def _linears(model: nn.Module) -> list[str]:
    """Oracle: every Linear / Conv1D by name, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]


def _tiny_llama_classifier() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=2,
    )  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("arch", [*sorted(TINY), "llama-classifier"])
def test_all_linear_is_every_linear_layer_but_the_output_head(arch: str) -> None:
    model = _tiny_llama_classifier() if arch == "llama-classifier" else TINY[arch]()
    expected = [n for n in _linears(model) if n not in HEADS]
    head = {"bert": "classifier", "llama-classifier": "score"}.get(arch, "lm_head")
    assert head in _linears(
        model
    )  # the head exists and is a linear layer: it is skipped, not absent
    assert select_targets(model, "all-linear") == expected
    assert select_targets(model, "ALL-LINEAR") == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_presets_pick_exactly_their_roles(arch: str) -> None:
    model = TINY[arch]()
    keys = PRESETS[arch]
    expected = [n for n in _linears(model) if any(n == k or n.endswith("." + k) for k in keys)]
    assert expected and select_targets(model, f"preset:{arch}") == expected
    # every role of the preset occurs in every transformer block (2 blocks in the tiny models)
    assert len(expected) == 2 * len(keys)


def test_names_suffixes_and_regex_follow_peft() -> None:
    model = tiny_llama()
    assert select_targets(model, ("layers.1.mlp.gate_proj",)) == ["model.layers.1.mlp.gate_proj"]
    assert select_targets(model, ("model.layers.0.mlp.gate_proj", "o_proj")) == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    # a suffix matches whole dotted components only: "proj" is not a suffix of "gate_proj"
    with pytest.raises(SpecdefError, match="Unknown target layer 'proj'"):
        select_targets(model, ("proj",))
    pattern = r"model\.layers\.1\..*_proj"
    assert select_targets(model, pattern) == [
        n for n in _linears(model) if re.fullmatch(pattern, n)
    ]
    # a regex must match the whole name (re.fullmatch), not a part of it
    with pytest.raises(SpecdefError, match="matches no linear layer"):
        select_targets(model, "q_proj")


def test_exclude_removes_by_suffix_or_regex() -> None:
    model = tiny_llama()
    everything = select_targets(model, "all-linear")
    excluded = select_targets(model, "all-linear", exclude=("mlp.down_proj", "q_proj"))
    assert excluded == [n for n in everything if not n.endswith((".down_proj", ".q_proj"))]
    by_regex = select_targets(model, "all-linear", exclude=r".*\.layers\.0\..*")
    assert by_regex == [n for n in everything if ".layers.0." not in n]


def test_n_random_is_a_seeded_subset_in_module_order() -> None:
    model = tiny_llama()
    everything = select_targets(model, "all-linear")
    picked = select_targets(model, "all-linear", n_random=5, seed=3)
    assert len(set(picked)) == 5 and picked == [n for n in everything if n in picked]
    assert select_targets(tiny_llama(seed=1), "all-linear", n_random=5, seed=3) == picked
    draws = {tuple(select_targets(model, "all-linear", n_random=5, seed=s)) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    assert select_targets(model, "all-linear", n_random=len(everything)) == everything


def test_defended_layers_are_not_candidates_again() -> None:
    model = tiny_llama()
    apply_specdef_(model, SpecDefConfig(alpha=10, top_k=2, targets=("gate_proj",)))
    chosen = select_targets(model, "all-linear")
    assert not any(n.endswith((".inflated", ".compensation")) for n in chosen)
    assert not any(n.endswith("gate_proj") for n in chosen) and len(chosen) == 12


@pytest.mark.parametrize(
    ("targets", "kwargs", "match"),
    [
        (("gate_prj",), {}, r"Unknown target layer 'gate_prj'\. Did you mean: gate_proj"),
        ("preset:lama", {}, r"Unknown target preset 'lama'\. Did you mean: llama"),
        ("preset:bert", {}, r"Preset 'preset:bert' .* matches no layer"),
        ("all-linear", {"n_random": 99}, r"n_random must be in \[1, 14\]"),
        ("all-linear", {"n_random": 0}, r"n_random must be in \[1, 14\]"),
        ("all-linear", {"exclude": ".*"}, "remove every selected layer"),
        ("(", {}, "Invalid target regex"),
        ((), {}, "Empty target selection"),
    ],
)
def test_selection_errors(targets: str | tuple[str, ...], kwargs: dict, match: str) -> None:
    with pytest.raises(SpecdefError, match=match) as info:
        select_targets(tiny_llama(), targets, **kwargs)
    assert "\n" not in str(info.value)


def test_undefendable_models_are_clear_errors() -> None:
    with pytest.raises(SpecdefError, match="SpecDef defends linear layers only"):
        select_targets(nn.Sequential(nn.ReLU()), "all-linear")
    model = nn.Sequential(nn.Linear(4, 4))
    apply_specdef_(model, SpecDefConfig(alpha=10, top_k=2))
    with pytest.raises(SpecdefError, match="every linear layer is already defended"):
        select_targets(model, "all-linear")
    # a model whose only linear layer is its output head: "all-linear" refuses to pick the head
    with pytest.raises(SpecdefError, match=r"'all-linear' matches no layer .* besides its output"):
        select_targets(_OnlyHead(), "all-linear")
    assert select_targets(_OnlyHead(), ("head",)) == ["head"]  # named explicitly, it is allowed


class _OnlyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)

    def get_output_embeddings(self) -> nn.Module:
        return self.head
