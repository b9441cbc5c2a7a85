"""What a worst-case attacker searches: the common hyperparameters, each optimizer's own (its
registry entry's ``search_space``), the search's config, and a trial → attack spec."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from specdef.attack.loop import SCHEDULES, AttackSpec
from specdef.attack.optim import SearchParam, assemble_kwargs, choice, get_optimizer_entry
from specdef.attack.sweep import ModelVariant
from specdef.errors import SpecdefError

PRUNERS = ("halving", "hyperband", "none")
# searched for every optimizer; the learning rate's range is SearchConfig's
COMMON_SPACE: dict[str, SearchParam] = {
    "warmup": choice(0.0, 0.05, 0.1, 0.25),  # fraction of the steps
    "grad_clip": choice(None, 0.1, 1.0, 10.0),
    "weight_decay": choice(0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    "schedule": choice(*SCHEDULES),
}


@dataclass(frozen=True)
class SearchConfig:
    """How the attacker searches (fields that change the study are hashed into its name)."""

    trials: int  # finished trials (complete + pruned + failed) each optimizer's study ends with
    storage: str | None = None  # Optuna RDB URL or a journal file path; None: <out>/study.journal
    study: str | None = None  # study name prefix; None: derived from model, task, spec and config
    seed: int = 0  # TPESampler seed (trial k samples with seed + k, so a resumed study repeats)
    pruner: str = "halving"  # halving (successive halving) | hyperband | none
    min_resource: int | None = None  # steps before the first pruning rung; None: max(eval, steps/8)
    reduction_factor: int = 3  # pruners keep the best 1/reduction_factor at each rung
    lr_low: float = 1e-12
    lr_high: float = 1.0
    stale_after: float = 900.0  # s without heartbeat before another host's running trial re-runs
    warm_start: bool = False  # trial 0 of every study: the optimizer's known-good attack (warm.py)

    def __post_init__(self) -> None:
        checks = [
            (self.trials >= 1, f"trials >= 1, found {self.trials}"),
            (self.pruner in PRUNERS, f"pruner in {PRUNERS}, found {self.pruner!r}"),
            (0 < self.lr_low < self.lr_high, f"0 < lr_low < lr_high, found {self.lr_low}, "
             f"{self.lr_high}"),
            (self.reduction_factor >= 2, f"reduction_factor >= 2, found {self.reduction_factor}"),
            (self.min_resource is None or self.min_resource >= 1,
             f"min_resource >= 1, found {self.min_resource}"),
            (self.stale_after > 0, f"stale_after > 0, found {self.stale_after}"),
            (isinstance(self.warm_start, bool), f"warm_start true or false, found "
             f"{self.warm_start!r}"),
        ]  # fmt: skip
        for ok, what in checks:
            if not ok:
                raise SpecdefError(f"Invalid search config: expected {what}.")


def search_space(optimizer: str) -> dict[str, SearchParam]:
    """Everything a trial of ``optimizer`` samples besides the learning rate."""
    own = dict(get_optimizer_entry(optimizer).search_space)
    clash = sorted(set(own) & {*COMMON_SPACE, "lr"})
    if clash:
        raise SpecdefError(f"Optimizer {optimizer!r} search space reuses common names {clash}.")
    space = {**COMMON_SPACE, **own}
    entry = get_optimizer_entry(optimizer)
    if entry.needs_closure or entry.needs_create_graph:
        space["grad_clip"] = choice(None)  # the loop refuses clipping for these (see run_attack)
    return space


def study_name(
    optimizer: str,
    *,
    base: AttackSpec,
    variant: ModelVariant,
    task: str,
    config: SearchConfig,
    experiment: str,
) -> str:
    """A stable name: the same command resumes the same study; a changed spec starts another. The
    trial count is left out, so a rerun with a larger N extends the study."""
    if config.study:
        return f"{config.study}-{optimizer}"
    spec = base.to_dict()
    for key in ("optimizer", "lr"):
        spec.pop(key)
    identity = {
        "spec": spec,
        "variant_info": dict(variant.info),
        # warm_start only when on: names of studies from before the option stay the same
        "config": {k: v for k, v in dataclasses.asdict(config).items()
                   if k not in ("trials", "storage", "study", "stale_after")
                   and not (k == "warm_start" and not v)},
        "space": {k: dataclasses.asdict(v) for k, v in search_space(optimizer).items()},
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{experiment}-{variant.name}-{task}-{optimizer}-{digest[:10]}"


def _suggest(trial: Any, name: str, param: SearchParam) -> Any:
    if param.kind == "choice":
        return trial.suggest_categorical(name, list(param.choices))
    if param.kind == "int":
        return trial.suggest_int(name, int(param.low), int(param.high))
    return trial.suggest_float(name, param.low, param.high, log=param.kind == "log")


def trial_spec(trial: Any, base: AttackSpec, config: SearchConfig, optimizer: str) -> AttackSpec:
    """The attack a trial describes: ``base`` with the sampled hyperparameters."""
    lr = trial.suggest_float("lr", config.lr_low, config.lr_high, log=True)
    space = search_space(optimizer)
    values = {name: _suggest(trial, name, param) for name, param in space.items()}
    own = {k: v for k, v in values.items() if k not in COMMON_SPACE}
    return dataclasses.replace(
        base,
        optimizer=optimizer,
        lr=lr,
        warmup_steps=round(float(values["warmup"]) * base.steps),
        grad_clip=values["grad_clip"],
        weight_decay=float(values["weight_decay"]),
        schedule=str(values["schedule"]),
        optimizer_kwargs={**base.optimizer_kwargs, **assemble_kwargs(own)},
    )
