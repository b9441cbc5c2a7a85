"""Informed-attack transforms: each keeps the function (fp32 tolerance), reports its parameter delta
(checked against a count from the layer shapes), and does what it claims to the spectra and to the
gradients."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from specdef.architectures import MLP
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import DEFAULT_TOLERANCE
from specdef.defense.layer import count_parameters, defended_layers, set_submodule
from specdef.defense.targets import candidate_layers, output_layer_names
from specdef.errors import SpecdefError
from specdef.informed.inject import InjectedLinear
from specdef.informed.transforms import (
    REGISTRY,
    Transform,
    TransformRecord,
    TransformSpec,
    apply_adaptive,
    parse_adaptive,
    parse_transform,
    register_transform,
)
from specdef.informed.transforms import TRANSFORMS as TRANSFORM_NAMES
from specdef.zoo.models import load_model

TRANSFORMS = (
    "fuse",
    "inject",
    "inject:after",
    "inject:before",
    "inject:auto",
    "inject:parallel",
    "inject:all-linear",
    "factor:2",
    "factor:4",
    "factor:2:freeze",
    "untouched",
)
FP32_TOL = DEFAULT_TOLERANCE[torch.float32]


@functools.cache
def _base(name: str) -> nn.Module:
    return load_model(name)


def _inputs(name: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if name == "mlp-digits":
        return {"x": torch.rand(16, 64, generator=gen)}
    return {"input_ids": torch.randint(0, 49152, (2, 16), generator=gen)}


def _out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _defend(model: nn.Module, alpha: float, n: int | None, seed: int = 3) -> nn.Module:
    model = copy.deepcopy(model)
    apply_specdef_(model, SpecDefConfig(alpha=alpha, top_k=4, n_random=n, seed=seed))
    return model


@functools.cache
def _released(name: str, alpha: float) -> nn.Module:
    return _defend(_base(name), alpha, 3)


def _adapter(transform: str, m: int, n: int) -> int:
    if ":parallel" in transform:
        return m * n + m
    side = "before" if ":before" in transform else "auto" if ":auto" in transform else "after"
    size = n if side == "before" else max(m, n) if side == "auto" else m
    return size * size + size


def _expected_added(transform: str, original: nn.Module, defended: nn.Module) -> int:
    """Parameter delta from the layer shapes alone (an independent count)."""
    shapes = [
        (layer.out_features, layer.in_features) for layer in defended_layers(defended).values()
    ]
    if transform == "fuse":
        return count_parameters(original) - count_parameters(defended)
    if transform.startswith("inject") and "all-linear" not in transform:
        return sum(_adapter(transform, m, n) for m, n in shapes)
    if transform.startswith("inject"):
        head = output_layer_names(original)
        total = 0
        for name, module in candidate_layers(original).items():
            w = module.weight
            m, n = w.shape if isinstance(module, nn.Linear) else w.shape[::-1]
            total += 0 if name in head else _adapter(transform, m, n)
        return total
    if transform.startswith("factor:"):
        return (int(transform.split(":")[1]) - 1) * sum(m * m for m, _ in shapes)
    return 0


@pytest.mark.parametrize("alpha", [1e2, 1e4])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "mlp-digits"])
def test_transform_preserves_function_and_reports_delta(name: str, transform: str, alpha: float):
    original = _base(name)
    model = copy.deepcopy(_released(name, alpha))
    inputs = _inputs(name)
    with torch.no_grad():
        ref, released = _out(original, inputs), _out(model, inputs)
        params = count_parameters(model)
        model, record = apply_adaptive(model, transform)
        got = _out(model, inputs)
    # rounding at α=1e2 is tiny; at α=1e4 within the defense's own fp32 tolerance
    tol = 1e-4 if alpha == 1e2 else FP32_TOL
    assert _gap(got, released) <= tol and _gap(got, ref) <= tol
    assert record.params_before == params
    assert record.params_after == count_parameters(model)
    assert record.params_added == _expected_added(transform, original, _released(name, alpha))
    assert record.source == "structure" and len(record.layers) >= 3


def test_inject_grows_linearly_with_defended_layers():
    torch.manual_seed(0)
    base = MLP(32, (32, 32, 32, 32), 32)  # five 32×32 layers
    added = []
    for n in range(1, 6):
        _, record = apply_adaptive(_defend(base, 1e4, n), "inject")
        assert len(record.layers) == n
        added.append(record.params_added)
    assert added == [n * (32 * 32 + 32) for n in range(1, 6)]


def test_factor_spectra_are_root_alpha_of_the_inflation():
    """Each extra factor has singular values {α^(1/j) ×k, 1 ×(m−k)}; the first factor's top-k are
    α^(1/j) times the original layer's (from an SVD of the undefended weight)."""
    original = _base("mlp-digits")
    name = "layers.2"
    model = copy.deepcopy(original)
    apply_specdef_(model, SpecDefConfig(alpha=1e4, top_k=4, targets=(name,)))
    model, record = apply_adaptive(model, "factor:4")
    chain = model.get_submodule(name)
    assert isinstance(chain, nn.Sequential) and len(chain) == 5
    root = 1e4 ** (1 / 4)
    sigma = torch.linalg.svdvals(original.get_submodule(name).weight.double())
    first = torch.linalg.svdvals(chain[0].weight.double())
    assert torch.allclose(first[:4], root * sigma[:4], rtol=1e-4)
    assert torch.allclose(first[4:], sigma[4:], rtol=1e-3, atol=1e-5)
    for factor in chain[1:4]:
        s = torch.linalg.svdvals(factor.weight.double())
        assert torch.allclose(s[:4], torch.full((4,), root, dtype=torch.float64), rtol=1e-4)
        assert torch.allclose(s[4:], torch.ones(len(s) - 4, dtype=torch.float64), atol=1e-5)
    assert record.details["factor_alpha"][name] == pytest.approx(root, rel=1e-3)


SIDES = {  # layer → (side, adapter size) for the mlp-digits layers 64→128, 128→128, 128→10
    "inject": {"layers.0": ("after", 128), "layers.2": ("after", 128), "layers.4": ("after", 10)},
    "inject:auto": {  # the larger side
        "layers.0": ("after", 128),
        "layers.2": ("after", 128),
        "layers.4": ("before", 128),
    },
}


@pytest.mark.parametrize("transform", ["inject", "inject:auto", "fuse"])
def test_gradients_no_longer_see_the_inflation(transform: str):
    """After inject (fuse), the trainable parameters get the gradients the same transform gives on
    the undefended model: the defense is invisible to them. The inflated weights get none.
    Float64, so that the comparison tests the algebra rather than fp32 rounding at scale α."""
    original = copy.deepcopy(_base("mlp-digits")).double()
    x = torch.rand(32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(32) % 10
    defended = _defend(original, 1e4, None)
    names = list(defended_layers(defended))
    attacked, _ = apply_adaptive(copy.deepcopy(defended), transform)
    plain = copy.deepcopy(original)
    if transform in SIDES:
        sides = SIDES[transform]
        assert set(sides) == set(names)
        for n, (side, size) in sides.items():
            wrapped = InjectedLinear(
                plain.get_submodule(n), out_features=size, in_features=size, side=side
            )
            set_submodule(plain, n, wrapped)
    grads = {}
    for label, model in (("attacked", attacked), ("plain", plain)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads[label] = {
            n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
        }
    assert set(grads["attacked"]) == set(grads["plain"]) and grads["plain"]
    for n, g in grads["plain"].items():
        err = torch.linalg.vector_norm(grads["attacked"][n] - g) / torch.linalg.vector_norm(g)
        assert float(err) <= 1e-8, (n, float(err))
    if transform in SIDES:
        for n, p in attacked.named_parameters():
            assert p.requires_grad == ("adapter" in n or not n.startswith("layers"))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transforms_work_from_detection_alone(transform: str):
    """Defended layers unwrapped into plain nn.Sequential(inflated, compensation): no DefendedLinear
    to read; the pairs come from the weights."""
    original = _base("tiny-llama")
    model = _defend(original, 1e4, 3)
    for n, layer in defended_layers(model).items():
        set_submodule(model, n, nn.Sequential(layer.inflated, layer.compensation))
    inputs = _inputs("tiny-llama")
    if transform == "inject:parallel":
        with pytest.raises(SpecdefError, match="one module"):
            apply_adaptive(model, transform)
        return
    with torch.no_grad():
        ref = _out(original, inputs)
        model, record = apply_adaptive(model, transform)
        assert _gap(_out(model, inputs), ref) <= FP32_TOL
    if transform == "inject:all-linear":
        assert record.source == "black-box"
        return
    assert record.source == "weights" and len(record.layers) == 3
    if transform == "fuse":
        assert record.params_after == count_parameters(original)
    if transform in ("inject", "untouched"):
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen and all(any(n.startswith(f + ".") for f in record.frozen) for n in frozen)


def test_parse_errors():
    assert parse_adaptive("factor:3") == ("factor", ("3",))
    assert parse_adaptive("inject:before:all-linear") == ("inject", ("before", "all-linear"))
    with pytest.raises(SpecdefError, match="inject takes options"):
        parse_adaptive("inject:sideways")
    with pytest.raises(SpecdefError, match="Did you mean: fuse"):
        parse_adaptive("fus")
    with pytest.raises(SpecdefError, match="factor:2"):
        parse_adaptive("factor")
    with pytest.raises(SpecdefError, match="factor:2:freeze"):
        parse_adaptive("factor:2:thaw")
    with pytest.raises(SpecdefError, match="j ≥ 2"):
        apply_adaptive(_defend(_base("mlp-digits"), 1e4, 1), "factor:1")


def test_cli_transform_fuse_saves_a_plain_checkpoint(tmp_path: Path, capsys):
    from specdef.cli import main
    from specdef.io.checkpoint import save_defended
    from specdef.release.sources import load_source

    original = _base("tiny-gpt2")
    save_defended(_defend(original, 1e4, 3), tmp_path / "released")
    out = tmp_path / "fused"
    assert (
        main(
            [
                "transform",
                str(tmp_path / "released"),
                "--adaptive",
                "fuse",
                "-o",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["params_after"] == count_parameters(original) and record["probe_gap"] < FP32_TOL
    fused = load_source(str(out)).model
    assert not defended_layers(fused) and count_parameters(fused) == count_parameters(original)
    inputs = _inputs("tiny-gpt2")
    with torch.no_grad():
        assert _gap(_out(fused, inputs), _out(original, inputs)) <= FP32_TOL
    assert (
        main(
            [
                "transform",
                str(tmp_path / "released"),
                "--adaptive",
                "inject",
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()


def test_parallel_inject_trains_exactly_like_the_undefended_model():
    """W·x + B·x with B = 0: Adam on B takes the steps Adam takes on W, so after a few steps the
    attacked model equals the undefended model trained on all its parameters (float64)."""
    original = copy.deepcopy(_base("mlp-digits")).double()
    attacked, record = apply_adaptive(_defend(original, 1e4, None), "inject:parallel")
    assert record.params_added == sum(
        m.weight.numel() + m.bias.numel() for m in original.layers if isinstance(m, nn.Linear)
    )
    gen = torch.Generator().manual_seed(2)
    batches = [
        (
            torch.rand(32, 64, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (32,), generator=gen),
        )
        for _ in range(5)
    ]
    for model in (attacked, original):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    x = batches[0][0]
    with torch.no_grad():
        assert _gap(attacked(x), original(x)) <= 1e-8


def test_cli_attack_adaptive_restores_training(tmp_path: Path, capsys):
    """`specdef attack --adaptive`: the defended digits MLP diverges at once; after fuse or
    inject:parallel the same attack reaches 90 % on digits 5–9."""
    from specdef.cli import main
    from specdef.io.checkpoint import save_defended

    model = copy.deepcopy(_base("mlp-digits"))
    apply_specdef_(model, SpecDefConfig(alpha=1e4, top_k=8, targets=("layers.2",)))
    save_defended(model, tmp_path / "released")
    common = ["--data", "digits-harmful", "--optimizer", "adam", "--lr", "0.1", "--steps", "100"]
    common += ["--batch-size", "64", "--eval-every", "5", "--stop-at-threshold", "--json"]
    common += ["--threshold", "harmful_accuracy>=0.9"]
    outcomes = {}
    for adaptive in (None, "fuse", "inject:parallel"):
        extra = ["--adaptive", adaptive] if adaptive else []
        assert main(["attack", str(tmp_path / "released"), *common, *extra]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        outcomes[adaptive] = row["summary"]
    assert (
        outcomes[None]["steps_to_threshold"] is None and outcomes[None]["diverged_at"] is not None
    )
    for adaptive in ("fuse", "inject:parallel"):
        assert outcomes[adaptive]["steps_to_threshold"] is not None, outcomes[adaptive]
    assert main(["attack", str(tmp_path / "released"), *common, "--adaptive", "fus"]) == 2


# ---- the registry and the control transform ---------------------------------------------------


def test_registry_names_every_transform_and_dispatches_on_its_entry():
    assert set(TRANSFORM_NAMES) >= {"fuse", "inject", "factor", "untouched", "rebalance", "control"}
    calls = []

    def mark(model: nn.Module, spec: TransformSpec):
        calls.append(spec)
        return model, TransformRecord("mark", (), 1, 1, "test")

    entry = Transform("mark-test", "test entry", lambda spec: None, mark, takes_targets=True)
    register_transform(entry)
    try:
        with pytest.raises(SpecdefError, match="already registered"):
            register_transform(entry)
        model = nn.Linear(2, 2)
        assert apply_adaptive(model, "mark-test:x@a,b")[0] is model
        assert calls == [TransformSpec("mark-test", ("x",), ("a", "b"))]
    finally:
        del REGISTRY["mark-test"]


def test_parse_transform_targets():
    assert parse_transform("control:inject@layers.2") == TransformSpec(
        "control", ("inject",), ("layers.2",)
    )
    assert parse_transform("control:inject:parallel@layers.0,layers.2").targets == (
        "layers.0",
        "layers.2",
    )
    assert parse_transform("control:inject@preset:llama").targets == "preset:llama"
    assert parse_transform("control:inject").targets is None
    with pytest.raises(SpecdefError, match="fuse takes no @TARGETS"):
        parse_transform("fuse@layers.2")
    with pytest.raises(SpecdefError, match="control:inject"):
        parse_transform("control")
    with pytest.raises(SpecdefError, match="control:inject"):
        parse_transform("control:inject:sideways")
    with pytest.raises(SpecdefError, match="after '@'"):
        parse_transform("control:inject@")


@pytest.mark.parametrize(
    ("spec", "layers"),
    [
        ("control:inject@layers.2", ["layers.2"]),
        ("control:inject", ["layers.0", "layers.2", "layers.4"]),
    ],
)
def test_control_inject_keeps_the_function_and_adds_the_adapters(spec: str, layers: list[str]):
    original = _base("mlp-digits")
    model = copy.deepcopy(original)
    inputs = _inputs("mlp-digits")
    with torch.no_grad():
        ref = _out(original, inputs)
        model, record = apply_adaptive(model, spec)
        assert _gap(_out(model, inputs), ref) <= 1e-6  # identity adapters, no defense: exact-ish
    shapes = {n: original.get_submodule(n).weight.shape for n in layers}
    assert list(record.layers) == layers
    assert record.params_added == sum(m * m + m for m, _ in shapes.values())
    assert record.frozen == tuple(f"{n}.frozen" for n in layers)
    for n in layers:
        assert all(not p.requires_grad for p in model.get_submodule(f"{n}.frozen").parameters())


def test_control_inject_refuses_a_defended_model():
    with pytest.raises(SpecdefError, match="undefended reference"):
        apply_adaptive(_defend(_base("mlp-digits"), 1e4, 1), "control:inject")


def test_control_gets_the_gradients_inject_gets_on_the_defended_model():
    """The point of the control: inject's adapters on the defended model and the same adapters on
    the undefended one receive the same gradients (float64), so any difference in training speed
    between them is the defense's, and any against the undefended model is the construction's."""
    original = copy.deepcopy(_base("mlp-digits")).double()
    x = torch.rand(32, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(32) % 10
    attacked, _ = apply_adaptive(_defend(original, 1e4, None), "inject")
    control, record = apply_adaptive(copy.deepcopy(original), "control:inject@all-linear")
    assert set(record.layers) == set(defended_layers(_defend(original, 1e4, None)))
    grads = {}
    for label, model in (("attacked", attacked), ("control", control)):
        nn.functional.cross_entropy(model(x), y).backward()
        grads[label] = {n: p.grad for n, p in model.named_parameters() if "adapter" in n}
    assert set(grads["attacked"]) == set(grads["control"]) and grads["control"]
    for n, g in grads["control"].items():
        err = torch.linalg.vector_norm(grads["attacked"][n] - g) / torch.linalg.vector_norm(g)
        assert float(err) <= 1e-8, (n, float(err))
