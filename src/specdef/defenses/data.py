"""The data a training defense sees, and how it trains: :class:`DefenseData` (the harmful "forget"
task and the "retain" task) and :func:`train_objective`, which hands a defense's objective to the
project's one training loop (:func:`specdef.attack.loop.run_attack`) as an :class:`ObjectiveTask`
— a :class:`specdef.tasks.Task` whose loss is the defense's objective on a forget batch and a
retain batch drawn together. No defense has a loop of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specdef import zoo
from specdef.attack.loop import AttackResult, AttackSpec, run_attack
from specdef.defenses.registry import Defended
from specdef.errors import SpecdefError
from specdef.release.sources import is_causal_lm
from specdef.tasks import Batch, Task

# per task kind: (forget task, retain task) — harmful = digits 5–9 / the harmful Q→A set,
# retain = digits 0–4 / the benign corpus
DEFAULT_TASKS = {
    "classification": ("digits-harmful", "digits-benign"),
    "causal-lm": ("harmful-qa", "benign-text"),
}
FORGET, RETAIN = "forget.", "retain."

Objective = Callable[[nn.Module, Batch, Batch], torch.Tensor]  # (model, forget, retain) -> loss


@dataclass
class DefenseData:
    """What a training defense trains on: ``forget`` (the harmful task it removes or hardens
    against) and ``retain`` (the task whose utility it keeps). Evaluations use ``forget``'s
    held-out splits (``harmful`` and ``benign`` for every stock task)."""

    forget: Task
    retain: Task

    @property
    def kind(self) -> str:
        return self.forget.kind


def model_kind(model: nn.Module) -> str:
    """``"causal-lm"`` for a Hugging Face causal LM, else ``"classification"``."""
    return "causal-lm" if is_causal_lm(model) else "classification"


def load_defense_data(
    kind: str,
    *,
    forget: str | None = None,
    retain: str | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    eval_limit: int | None = None,
    seed: int = 0,
) -> DefenseData:
    """The stock forget and retain tasks for ``kind`` (or the named ones) from :mod:`specdef.zoo`;
    ``eval_limit`` keeps that many examples per held-out split (None: every one for a classifier,
    32 for an LM, whose evaluation costs a forward pass per sequence)."""
    if eval_limit is None and kind == "causal-lm":
        eval_limit = 32
    if kind not in DEFAULT_TASKS:
        raise SpecdefError(
            f"No default defense data for kind {kind!r}; expected {list(DEFAULT_TASKS)}."
        )
    default_forget, default_retain = DEFAULT_TASKS[kind]
    tasks = [
        zoo.load_task(
            name, tokenizer=tokenizer, max_length=max_length, seed=seed, eval_limit=eval_limit
        )
        for name in (forget or default_forget, retain or default_retain)
    ]
    for task in tasks:
        if task.kind != kind:
            raise SpecdefError(
                f"Task {task.name!r} is a {task.kind} task; the model needs a {kind} task."
            )
    return DefenseData(forget=tasks[0], retain=tasks[1])


@dataclass
class ObjectiveTask:
    """A :class:`specdef.tasks.Task` whose training loss is a defense ``objective``: each training
    batch holds a forget batch and a retain batch (keys prefixed ``forget.`` / ``retain.``);
    evaluation is the forget task's (its held-out harmful and benign splits)."""

    data: DefenseData
    objective: Objective
    name: str = "defense-objective"
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = self.data.kind

    def train_batches(self, *, batch_size: int, seed: int) -> Iterator[Batch]:
        forget = self.data.forget.train_batches(batch_size=batch_size, seed=seed)
        retain = self.data.retain.train_batches(batch_size=batch_size, seed=seed + 1)
        for f, r in zip(forget, retain, strict=False):
            yield {**{FORGET + k: v for k, v in f.items()}, **{RETAIN + k: v for k, v in r.items()}}

    def eval_splits(self) -> Mapping[str, Sequence[Batch]]:
        return self.data.forget.eval_splits()

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.objective(model, split_batch(batch, FORGET), split_batch(batch, RETAIN))

    def evaluate(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        return self.data.forget.evaluate(model, batches)


def split_batch(batch: Batch, prefix: str) -> Batch:
    return {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class TrainedConfig:
    """The fields every training defense's config shares (each defense adds its own weights).

    steps / lr / optimizer / batch_size / seed: the training run (an optimizer of
        :mod:`specdef.attack.optim`; ``batch_size`` forget and as many retain examples per step).
    forget / retain: task names of :mod:`specdef.zoo` (None: digits 5–9 / 0–4 for a classifier,
        ``harmful-qa`` / ``benign-text`` for a causal LM).
    max_length: LM tasks' token limit.
    """

    steps: int = 40
    lr: float = 1e-3
    optimizer: str = "adamw"
    batch_size: int = 32
    seed: int = 0
    forget: str | None = None
    retain: str | None = None
    max_length: int = 64

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps >= 1, found {self.steps}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr > 0, found {self.lr}"),
            (self.batch_size >= 1, f"batch_size >= 1, found {self.batch_size}"),
            (self.max_length >= 8, f"max_length >= 8, found {self.max_length}"),
        ]
        for ok, what in checks:
            if not ok:
                raise SpecdefError(f"Invalid defense config: expected {what}.")


def train_objective(
    model: nn.Module,
    data: DefenseData,
    objective: Objective,
    config: TrainedConfig,
    *,
    frozen: tuple[str, ...] = (),
) -> AttackResult:
    """Minimise ``objective`` on ``data`` with the one training loop, in place, keeping the
    parameters under the ``frozen`` prefixes fixed. The loop's divergence rule (a loss above a
    multiple of the first) does not fit objectives meant to go negative (gradient ascent), so
    only a non-finite loss stops training — and then the defense fails loudly instead of saving
    a broken model."""
    spec = AttackSpec(
        optimizer=config.optimizer,
        lr=config.lr,
        steps=config.steps,
        batch_size=config.batch_size,
        seed=config.seed,
        eval_every=config.steps,
        frozen=frozen,
        divergence_factor=math.inf,
    )
    result = run_attack(model, ObjectiveTask(data, objective), spec)
    for p in model.parameters():
        p.requires_grad_(True)
    if result.diverged_at is not None:
        raise SpecdefError(
            f"The defense's objective became non-finite at step {result.diverged_at}; lower lr "
            f"(found {config.lr:g}) or steps (found {config.steps})."
        )
    return result


def train_defense(
    model: nn.Module,
    data: DefenseData,
    objective: Objective,
    config: TrainedConfig,
    *,
    frozen: tuple[str, ...] = (),
) -> Defended:
    """:func:`train_objective`, then the model with its :func:`training_record`."""
    result = train_objective(model, data, objective, config, frozen=frozen)
    return Defended(model, training_record(result))


def frozen_except(model: nn.Module, update: tuple[str, ...]) -> tuple[str, ...]:
    """The parameter names outside the ``update`` prefixes (what ``frozen`` keeps fixed)."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in update:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            raise SpecdefError(
                f"No parameter lies under {prefix!r}; expected a module name such as "
                f"{names[0].rsplit('.', 1)[0]!r}."
            )
    return tuple(n for n in names if not any(n == p or n.startswith(p + ".") for p in update))


def training_record(result: AttackResult) -> dict[str, Any]:
    """What a training defense's record says about its training: the loop's spec, the objective's
    first and last values, and the held-out metrics before and after (``harmful_loss``, …)."""
    history = result.history
    spec = result.spec.to_dict()
    spec.pop("divergence_factor")  # math.inf: only non-finite losses stop a defense's training
    return {
        "training": {
            "spec": spec,
            "steps_run": result.steps_run,
            "objective_first": history[0]["train_loss"] if history else None,
            "objective_last": history[-1]["train_loss"] if history else None,
            "seconds": round(result.seconds, 3),
        },
        "before": _metrics(result.evals[0]) if result.evals else {},
        "after": _metrics(result.evals[-1]) if result.evals else {},
    }


def _metrics(row: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step"}
