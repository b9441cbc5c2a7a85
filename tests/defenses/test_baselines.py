"""Each baseline changes what its paper says it changes, measured on held-out real data with
evaluations independent of the defense's own objective (task metrics, activations read by
forward hooks here, SVDs in float64)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from _attack_helpers import post_attack_harmful_loss
from specdef.defense.layer import defended_layers
from specdef.defenses import immunization, representation
from specdef.defenses.catalog import make_defense
from specdef.defenses.data import DefenseData
from specdef.tasks import ClassificationTask


def _heldout(model: nn.Module, data: DefenseData, split: str) -> dict[str, float]:
    return data.forget.evaluate(model, data.forget.eval_splits()[split])


def _log_likelihood(model: nn.Module, data: DefenseData) -> float:
    x, y = data.forget.heldout["harmful"]
    with torch.no_grad():
        return float(F.log_softmax(model(x), -1).gather(1, y[:, None]).mean())


def test_gradient_ascent_raises_the_harmful_loss(mlp: nn.Module, digits_data: DefenseData) -> None:
    before = _heldout(mlp, digits_data, "harmful")
    make_defense("gradient-ascent", {"steps": 20, "lr": 1e-3}).apply(mlp, digits_data)
    after = _heldout(mlp, digits_data, "harmful")
    assert after["loss"] > 10 * before["loss"]
    assert after["accuracy"] < 0.2 < before["accuracy"]


def test_npo_lowers_the_harmful_likelihood_and_keeps_the_retain_task(
    mlp: nn.Module, digits_data: DefenseData
) -> None:
    ll_before = _log_likelihood(mlp, digits_data)
    benign_before = _heldout(mlp, digits_data, "benign")["accuracy"]
    make_defense("npo", {"steps": 40}).apply(mlp, digits_data)
    assert _log_likelihood(mlp, digits_data) < ll_before - 5.0  # π(y|x) down by > e^5
    assert _heldout(mlp, digits_data, "benign")["accuracy"] >= benign_before - 0.1


def _activations(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    store: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return store[0]


def test_rmu_misdirects_harmful_activations_and_keeps_retain_ones(
    mlp: nn.Module, digits_data: DefenseData
) -> None:
    reference = copy.deepcopy(mlp)
    record = make_defense("rmu").apply(mlp, digits_data).record["rmu"]
    layer = record["layer"]
    x_h, _ = digits_data.forget.heldout["harmful"]
    x_r, _ = digits_data.retain.heldout["benign"]
    h0, h1 = _activations(reference, x_h, layer), _activations(mlp, x_h, layer)
    u = representation.rmu_direction(h0.shape[-1], seed=0)
    target = record["target_norm"] * u
    assert (h1 - target).norm(dim=-1).mean() < 0.8 * (h0 - target).norm(dim=-1).mean()
    cos = (
        F.cosine_similarity(h1, u[None], dim=-1).mean()
        - F.cosine_similarity(h0, u[None], dim=-1).mean()
    )
    assert cos > 0.2
    r0, r1 = _activations(reference, x_r, layer), _activations(mlp, x_r, layer)
    harmful_move = (h1 - h0).norm() / h0.norm()
    retain_move = (r1 - r0).norm() / r0.norm()
    assert retain_move < 0.5 * harmful_move


def test_repnoise_raises_harmful_loss_noises_representations_retain_loss_bounded(
    mlp: nn.Module, digits_data: DefenseData
) -> None:
    harmful_before = _heldout(mlp, digits_data, "harmful")["loss"]
    benign_before = _heldout(mlp, digits_data, "benign")["loss"]
    record = make_defense("repnoise").apply(mlp, digits_data).record["repnoise"]
    assert _heldout(mlp, digits_data, "harmful")["loss"] > 5 * harmful_before
    assert _heldout(mlp, digits_data, "benign")["loss"] <= benign_before + 0.1
    assert record["noise_mmd_after"] < 0.8 * record["noise_mmd_before"]


def _post_attack_harmful_loss(model: nn.Module, data: DefenseData) -> float:
    """5 SGD steps at lr 0.1 on digits 5–9 (batch 32), then the held-out harmful loss."""
    return post_attack_harmful_loss(model, data.forget, lr=0.1, batch_size=32)


def test_tar_raises_the_post_attack_harmful_loss(mlp: nn.Module, digits_data: DefenseData) -> None:
    unlearned = copy.deepcopy(mlp)
    make_defense("gradient-ascent", {"steps": 20}).apply(unlearned, digits_data)
    make_defense("tar").apply(mlp, digits_data)
    tar_loss = _post_attack_harmful_loss(mlp, digits_data)
    assert tar_loss > 3 * _post_attack_harmful_loss(unlearned, digits_data)  # vs. no TAR: GA only
    assert _heldout(mlp, digits_data, "benign")["accuracy"] > 0.9


def _linear_probe_setting(data: DefenseData) -> tuple[nn.Module, DefenseData]:
    """Zheng et al.'s setting on digits: a linear feature extractor θ = I (on the pixels that vary
    in both tasks, so both feature covariances have full rank) under a linear probe."""
    x, xr = data.forget.train[0], data.retain.train[0]
    keep = (x.var(0) > 1e-3) & (xr.var(0) > 1e-3)

    def task(name: str, t: ClassificationTask) -> ClassificationTask:
        heldout = {k: (a[:, keep], b) for k, (a, b) in t.heldout.items()}
        return ClassificationTask(name, (t.train[0][:, keep], t.train[1]), heldout)

    d = int(keep.sum())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d, bias=False), nn.Linear(d, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(d))
    return model, DefenseData(task("harmful", data.forget), task("retain", data.retain))


def test_condition_number_immunization_raises_the_harmful_condition_number(
    digits_data: DefenseData,
) -> None:
    model, data = _linear_probe_setting(digits_data)
    x_h = data.forget.train[0]
    before = immunization.condition_number(model[0](x_h).detach())
    plain = copy.deepcopy(model)
    make_defense("condition-number", {"steps": 100, "ill_weight": 10.0}).apply(model, data)
    make_defense("condition-number", {"steps": 100, "ill_weight": 0.0, "well_weight": 0.0}).apply(
        plain, data
    )
    after = immunization.condition_number(model[0](x_h).detach())
    # κ(θᵀK_Hθ) from a separate float64 SVD of the features, against the same training without R_ill
    assert after > 4 * before
    assert after > 1.5 * immunization.condition_number(plain[0](x_h).detach())


def test_unlearned_specdef_unlearns_then_defends_preserving_the_unlearned_function(
    mlp: nn.Module, digits_data: DefenseData
) -> None:
    harmful_before = _heldout(mlp, digits_data, "harmful")["loss"]
    defense = make_defense(
        "unlearned-specdef",
        {"unlearning": "npo", "unlearning_config": {"steps": 20}, "alpha": 100.0, "top_k": 2},
    )
    x, _ = digits_data.forget.heldout["harmful"]
    captured: dict[str, torch.Tensor] = {}
    original = make_defense("npo", {"steps": 20})
    unlearned = copy.deepcopy(mlp)
    original.apply(unlearned, digits_data)
    with torch.no_grad():
        captured["unlearned"] = unlearned(x)
    defended = defense.apply(mlp, digits_data)
    assert len(defended_layers(defended.model)) == 3
    with torch.no_grad():
        out = defended.model(x)
    assert torch.allclose(out, captured["unlearned"], rtol=1e-3, atol=1e-3 * out.abs().max())
    assert _heldout(defended.model, digits_data, "harmful")["loss"] > 5 * harmful_before
    assert defended.record["unlearning"]["name"] == "npo"
