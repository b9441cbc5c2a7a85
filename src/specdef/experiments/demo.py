"""The default demo: train a small MLP on scikit-learn's bundled digits, defend it, save and
reload it, and verify the function is unchanged while the top singular values grew by α.

Runs offline in a few seconds on a CPU. ``specdef demo`` prints the result; a later stage of the
project grows this into defend → attack → report.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specdef.architectures import build_architecture
from specdef.defense import probe as probing
from specdef.defense.apply import DefenseReport, apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import DEFAULT_TOLERANCE
from specdef.errors import SpecdefError
from specdef.experiments.config import config_from_mapping
from specdef.experiments.run import prepare_run_dir, run_experiment
from specdef.io.checkpoint import load_defended, save_defended
from specdef.report.page import write_report
from specdef.utils.files import read_jsonl


@dataclass
class DemoResult:
    """What the demo measured; ``passed`` iff the reloaded defended model is within tolerance."""

    report: DefenseReport
    accuracy_before: float
    accuracy_after: float
    max_abs_diff: float  # on the held-out logits, reloaded defended model vs original
    max_rel_diff: float  # max |Δ logit| / max |logit|
    tolerance: float
    passed: bool
    train_seconds: float
    n_train: int
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "report"}
        out["defense"] = self.report.to_dict()
        return out


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1797 8×8 images) scaled to [0, 1], split 80/20 with ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train_mlp(
    x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, epochs: int = 30, batch_size: int = 64
) -> torch.nn.Module:
    """A 64-64-64-10 ReLU MLP trained with Adam (seeded; a couple of seconds on a CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_architecture("mlp", in_features=64, hidden=[64, 64], out_features=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def run_demo(*, alpha: float = 1e4, top_k: int = 8, seed: int = 0, epochs: int = 30) -> DemoResult:
    """Train, defend (all linear layers), save + reload, and compare on the held-out digits."""
    x_train, y_train, x_test, y_test = digits_split(seed)
    start = time.perf_counter()
    model = train_mlp(x_train, y_train, seed=seed, epochs=epochs)
    train_seconds = time.perf_counter() - start
    reference = probing.model_output(model, x_test)
    acc_before = accuracy(model, x_test, y_test)
    config = SpecDefConfig(alpha=alpha, top_k=top_k, targets="all-linear", seed=seed)
    report = apply_specdef_(model, config, probe=x_test)
    with tempfile.TemporaryDirectory(prefix="specdef-demo-") as tmp:
        save_defended(model, f"{tmp}/defended", report=report)
        reloaded = load_defended(f"{tmp}/defended")
    out = probing.model_output(reloaded, x_test)
    max_abs = probing.max_abs_diff(out, reference)
    max_rel = max_abs / float(reference.abs().max())
    tolerance = DEFAULT_TOLERANCE[torch.float32]
    return DemoResult(
        report=report,
        accuracy_before=acc_before,
        accuracy_after=accuracy(reloaded, x_test, y_test),
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        tolerance=tolerance,
        passed=max_rel <= tolerance,
        train_seconds=train_seconds,
        n_train=len(y_train),
        n_test=len(y_test),
    )


# ---- the full demo: attack defended vs undefended, one informed attack, a report ---------------

ATTACK_DEMO: dict[str, Any] = {
    "name": "demo",
    "kind": "attack",
    "claim": "3 and 6: first-order attacks fail; an informed attacker restores convergence",
    "description": "mlp-digits (zoo) attacked on digits 5–9 with Adam: undefended, SpecDef α=1e4, "
    "and SpecDef α=1e4 after the informed 'fuse' transform.",
    "model": "mlp-digits",
    "task": "digits-harmful",
    "defense": {"alpha": None, "top_k": 8, "targets": "all-linear"},
    "attack": {
        "optimizer": "adam",
        "lr": 1e-2,
        "steps": 150,
        "batch_size": 64,
        "eval_every": 10,
        "threshold": "harmful_accuracy>=0.9",
        "stop_at_threshold": True,
    },
    "grid": {
        "variants": [
            {"defense.alpha": None},
            {"defense.alpha": 1e4},
            {"defense.alpha": 1e4, "attack.adaptive": "fuse"},
        ],
        "attack": {"lr": [1e-3, 1e-2, 1e-1]},
    },
    "seeds": [0],
}
_DEMO_FILES = ("config.yaml", "results.jsonl", "report.md")


@dataclass
class AttackDemoResult:
    """The attack part of the demo: one row per run and where the report is."""

    rows: list[dict[str, Any]]
    report: str
    figures: list[str]
    seconds: float


def run_attack_demo(out_dir: str = "runs/demo") -> AttackDemoResult:
    """Run :data:`ATTACK_DEMO` with the experiment runner (zoo model, SpecDef, the one attack loop,
    :mod:`specdef.informed.transforms`) into ``out_dir`` and write ``report.md`` with its loss-curve PNG.

    A previous demo's artefacts in ``out_dir`` are replaced when the embedded config changed;
    a folder holding anything else is refused.
    """
    import shutil
    from pathlib import Path

    start = time.perf_counter()
    config = config_from_mapping(ATTACK_DEMO, source="the embedded demo config")
    path = Path(out_dir)
    try:
        prepare_run_dir(config, path)
    except SpecdefError:
        foreign = [
            p.name for p in path.iterdir() if p.name not in _DEMO_FILES and p.suffix != ".png"
        ]
        if foreign:
            raise SpecdefError(
                f"{str(path)!r} holds files that are not a demo's ({', '.join(sorted(foreign)[:3])}); "
                "choose another --out."
            ) from None
        shutil.rmtree(path)
    summary = run_experiment(config, run_dir=path)
    report = write_report(path, title="specdef demo: defended vs undefended vs informed attack")
    return AttackDemoResult(
        rows=read_jsonl(summary.results),
        report=str(report),
        figures=sorted(str(p) for p in path.glob("*.png")),
        seconds=time.perf_counter() - start,
    )
