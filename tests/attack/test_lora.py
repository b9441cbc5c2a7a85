"""peft LoRA through the attack loop on a defended tiny Llama (acceptance 4): attention-only
targets adapt the ``inflated`` children of defended layers and never a compensation layer;
``"all-linear"`` also adapts every compensation layer, whose α-scaled inputs show in the gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from specdef import zoo
from specdef.attack.loop import AttackSpec, lora_target_modules, run_attack
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError
from specdef.tasks import CausalLMTask

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_llama() -> torch.nn.Module:
    """The zoo's 64-token tiny Llama (random init, seed 0), the model of the LoRA study."""
    return zoo.load_model("tiny-llama-perm", attn_implementation="eager")


def successor_task() -> CausalLMTask:
    """Sequences that follow a fixed random successor permutation of the vocabulary (language A)."""
    task = zoo.load_task("perm-benign")
    assert isinstance(task, CausalLMTask)
    return task


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    plain = tiny_llama()
    defended = copy.deepcopy(plain)
    apply_specdef_(defended, SpecDefConfig(alpha=1e4, top_k=8, targets="preset:llama"))
    return {"plain": plain, "defended": defended}


def lora_modules(model: torch.nn.Module) -> set[str]:
    return {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}


def test_attention_targets_resolve_to_inflated_children(models: dict[str, torch.nn.Module]) -> None:
    model = models["defended"]
    resolved = lora_target_modules(model, ATTENTION)
    defended = set(defended_layers(model))
    assert defended and all(n.endswith(("gate_proj", "v_proj", "o_proj")) for n in defended)
    assert isinstance(resolved, list)
    for name in resolved:
        base = name.removesuffix(".inflated")
        assert (name != base) == (base in defended)
        assert not name.endswith("compensation")
    assert lora_target_modules(model, ("all-linear",)) == "all-linear"
    with pytest.raises(SpecdefError, match="matches no module"):
        lora_target_modules(model, ("qq_proj",))


@pytest.mark.parametrize("targets", [ATTENTION, ("all-linear",)], ids=["attention", "all-linear"])
def test_lora_runs_on_defended_tiny_llama(
    models: dict[str, torch.nn.Module], targets: tuple[str, ...]
) -> None:
    spec = AttackSpec(
        optimizer="adamw", lr=1e-2, steps=15, batch_size=16, eval_every=5, train="lora",
        lora_targets=targets,
    )  # fmt: skip
    results = {}
    for name in ("plain", "defended"):
        model = copy.deepcopy(models[name])
        results[name] = run_attack(model, successor_task(), spec)
        adapted = lora_modules(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)  # only adapters train
        on_compensation = {n for n in adapted if n.endswith(".compensation")}
        if name == "defended":
            # all-linear adapts all 6 compensation layers; attention-only none of them
            assert len(on_compensation) == (6 if targets == ("all-linear",) else 0)
    plain, defended = results["plain"], results["defended"]
    for r in (plain, defended):
        assert r.steps_run == 15 and all(math.isfinite(h["train_loss"]) for h in r.history)
    ratio = defended.history[0]["grad_norm"] / plain.history[0]["grad_norm"]
    if targets == ("all-linear",):
        assert ratio > 100  # the compensation adapters' inputs carry the α-inflated directions
    else:
        assert ratio < 2  # adapters on inflated layers feed through C = T⁻¹, which only shrinks
