"""Known-good attacks on the undefended ``mlp-digits``: for every registered optimizer, the
hyperparameters a search found (or a hand-tune, where a search did not) that fine-tune it to
harmful accuracy ≥ 0.75 on digits 5–9 within 300 steps — the data behind a search's warm start
(``SearchConfig.warm_start``: the optimizer's entry is the first trial of every study) and behind
``tests/attack/test_baselines.py``, which reruns each entry.

Each entry is in the search's own names (``lr``, ``warmup`` as a fraction of the steps,
``grad_clip``, ``weight_decay``, ``schedule`` and the optimizer's ``search_space`` keys such as
``betas.0``), so it is a point of the space every study searches and Optuna can enqueue it. Found
with 12-trial searches (24 for adahessian / newton-cg, 10 for kfac / ekfac / ggn-cg / spsa; TPE
seed 0, the lr range narrowed to the undefended model's)::

    specdef attack mlp-digits --data digits-harmful --optimizer NAMES --search 12 --steps 300 \\
        --lr-range 1e-4,1 --stop-at-threshold --threshold harmful_accuracy>=0.75

at batch 8. ``steps`` is what the entry needed there (evaluations every 10 steps); ``robust``
says whether that count survives a change of CPU (entries on a divergence edge do not: the test
then checks only that the threshold is reached within the budget without diverging).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from specdef.attack.optim import SearchParam
from specdef.attack.search.space import SearchConfig, search_space
from specdef.errors import SpecdefError

MODEL = "mlp-digits"
TASK = "digits-harmful"
THRESHOLD = "harmful_accuracy>=0.75"
BUDGET = 300  # steps
EVAL_EVERY = 10


@dataclass(frozen=True)
class KnownGood:
    """One optimizer's known-good attack on the undefended model (see the module docstring)."""

    params: Mapping[str, Any] = field(default_factory=dict)  # in the search space's names
    steps: int = BUDGET  # steps to THRESHOLD at batch_size it needed when found
    batch_size: int = 8  # the batch it was found at (a warm start keeps its study's batch)
    robust: bool = True  # the step count reproduces exactly on another CPU
    note: str = ""


def _p(lr: float, warmup: float, clip: float | None, wd: float, schedule: str, **own: Any) -> dict:
    return {"lr": lr, "warmup": warmup, "grad_clip": clip, "weight_decay": wd,
            "schedule": schedule, **own}  # fmt: skip


_ADAM = _p(0.01567667719550607, 0.0, 10.0, 0.01, "linear", **{"eps": 1.75482337310672e-06,
           "betas.0": 0.8812968079654268, "betas.1": 0.95})  # fmt: skip
_KFAC = _p(0.3727697013499733, 0.05, None, 0.01, "constant", damping=5.549593217926627e-05,
           damping_floor=0.7632929594089861, refresh=20)  # fmt: skip
_SGD = _p(0.3116862265422683, 0.0, 10.0, 0.001, "linear")

KNOWN_GOOD: dict[str, KnownGood] = {
    "adagrad": KnownGood(_p(0.02523645951744487, 0.05, None, 1e-4, "constant",
                            eps=5.4095914746697e-05, initial_accumulator_value=0.0), 70),
    "adahessian": KnownGood(_p(0.08976590791908493, 0.05, None, 1e-5, "linear",
                               hessian_power=0.5177658996381624,
                               **{"betas.0": 0.5360380934760852, "betas.1": 0.99}), 40),
    "adam": KnownGood(_ADAM, 30),
    "adamw": KnownGood(_ADAM, 30),
    "ekfac": KnownGood(_KFAC, 40),
    "ggn-cg": KnownGood(_p(0.3, 0.05, None, 0.01, "constant", damping=0.03, cg_iters=20), 20,
                        note="hand-tuned for margin: the searched lr 0.37 / damping 6.4e-3 "
                        "diverged at lr x1.25; here lr x0.8, x1, x1.25 all take 20 steps"),
    "kfac": KnownGood({**_KFAC, "fisher_type": "type-2"}, 40),
    "kron": KnownGood(_p(0.004656804637919571, 0.0, 10.0, 0.01, "constant",
                         momentum=0.5687895999116646, pre_conditioner_update_probability=1.0), 50),
    "lion": KnownGood(_p(0.01567667719550607, 0.0, 10.0, 0.01, "linear",
                         **{"betas.0": 0.8812968079654268, "betas.1": 0.99}), 40),
    "muon": KnownGood(_p(0.3116862265422683, 0.0, 10.0, 0.001, "linear",
                         momentum=0.8634170686470274, nesterov=True, adjust_lr_fn="original",
                         adamw_lr=7.337861637446021e-09), 10),
    "nesterov": KnownGood(_p(0.10074794185987106, 0.0, 10.0, 0.001, "linear",
                             momentum=0.8234013762529091), 40),
    "newton-cg": KnownGood(_p(0.2, 0.05, None, 0.01, "constant", damping=3.0, cg_iters=3), 160,
                           robust=False, note="hand-tuned: with 20 CG iterations every tried "
                           "damping <= 10 diverged somewhere in lr x0.8 ... x1.25 (the searched lr "
                           "0.052 / damping 0.17 at step 82 on an AMD EPYC, 70 steps elsewhere); "
                           "3 iterations and damping 3 reach 0.75 in 160-190 steps at all three"),
    "rmsprop": KnownGood(_p(0.004656804637919571, 0.0, 10.0, 0.01, "constant",
                            alpha=0.9138983069209282, momentum=0.9, eps=3.216573097240668e-10), 30),
    "sgd": KnownGood(_SGD, 40),
    "sgd-momentum": KnownGood(_p(0.18206875099388883, 0.0, 1.0, 0.001, "cosine",
                                 momentum=0.804222244540749), 30),
    "sgld": KnownGood({**_SGD, "noise": 0.00010061072373290678}, 40),
    "shampoo": KnownGood(_p(0.3727697013499733, 0.05, None, 1e-4, "constant", momentum=0.0,
                            matrix_eps=1.535933333129671e-05, preconditioning_compute_steps=1), 20),
    "signsgd": KnownGood(_p(0.01567667719550607, 0.0, 10.0, 0.01, "linear", momentum=0.9), 50),
    "soap": KnownGood(_p(0.3727697013499733, 0.05, None, 1e-4, "constant",
                         precondition_frequency=1, eps=2.1256650620090325e-08,
                         **{"betas.0": 0.9293711510512475, "betas.1": 0.9}), 10),
    "sophiah": KnownGood(_p(0.7381070543530439, 0.05, None, 1e-5, "linear",
                            p=0.005931199953590064,
                            **{"betas.0": 0.5802826982883024, "betas.1": 0.99}), 40),
    "spsa": KnownGood(_p(0.01, 0.0, None, 0.0, "constant", eps=0.01, perturbations=16), 90,
                      batch_size=32, note="not found by its 10-trial search (batch 8, best 0.46 "
                      "in 300 steps); tuned by hand: batch 32, 16 directions, lr 1e-2, eps 1e-2"),
}  # fmt: skip


def _inside(value: Any, param: SearchParam) -> bool:
    if param.kind == "choice":
        return any(value == c and type(value) is type(c) for c in param.choices)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if param.kind == "int" and int(value) != value:
        return False
    return bool(param.low <= value <= param.high)


def warm_params(optimizer: str, config: SearchConfig) -> dict[str, Any]:
    """The known-good parameters of ``optimizer`` as a trial of ``config``'s search; a value
    outside the search space (or the lr outside ``config``'s range) is an error, not a warning."""
    if optimizer not in KNOWN_GOOD:
        raise SpecdefError(
            f"No known-good attack for optimizer {optimizer!r} to warm-start from; known: "
            f"{', '.join(sorted(KNOWN_GOOD))}. Add one to specdef.attack.search.warm or drop "
            "warm_start."
        )
    params = dict(KNOWN_GOOD[optimizer].params)
    space = search_space(optimizer)
    if set(params) != {"lr", *space}:
        raise SpecdefError(
            f"Known-good {optimizer!r} names {sorted(params)}, its search space "
            f"{sorted({'lr', *space})}."
        )
    lr = float(params["lr"])
    if not config.lr_low <= lr <= config.lr_high:
        raise SpecdefError(
            f"warm_start: the known-good {optimizer} lr {lr:.3g} is outside the searched range "
            f"[{config.lr_low:g}, {config.lr_high:g}]; widen lr_low/lr_high or drop warm_start."
        )
    for name, param in space.items():
        if not _inside(params[name], param):
            raise SpecdefError(
                f"Known-good {optimizer!r} {name}={params[name]!r} is outside its search space "
                f"{param}."
            )
    return params
