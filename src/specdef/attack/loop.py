"""Fine-tuning attacks: an :class:`AttackSpec` (pure data) and :func:`run_attack`, the one training
loop every experiment uses, for any model, task and registered optimizer.

The loop reads the optimizer's capability flags (``specdef.attack.optim``), never its name. Divergence —
a non-finite loss, or a training loss above ``divergence_factor`` × the first one — is a measured
outcome (``diverged_at``): training stops there and the result says so; nothing is raised.

Multi-GPU / multi-node: pass an ``accelerate.Accelerator`` (see ``docs/attacks.md``); the model is
prepared for data parallelism, every process draws the same global stream of
``batch_size × processes`` examples and trains on its own slice of each batch (so N processes see
exactly what one process with the global batch sees), and backward goes through the accelerator.
Without one, the loop is plain single-process PyTorch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from specdef.attack.metrics import (
    DEFAULT_METRIC,
    Ladder,
    StepsToThreshold,
    Threshold,
    steps_to_threshold,
    threshold_ladder,
)
from specdef.attack.natural import BatchAware
from specdef.attack.optim import get_optimizer_entry, make_optimizer
from specdef.defense.layer import defended_layers, parameter_roles
from specdef.errors import SpecdefError
from specdef.tasks import Batch, Task
from specdef.utils.devices import to_device

log = logging.getLogger(__name__)

TRAIN_MODES = ("all", "untouched", "lora")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class AttackSpec:
    """One fine-tuning attack, fully resolved (its JSON form is hashed into a ``run_id``)."""

    optimizer: str = "adamw"  # a name in specdef.attack.optim.OPTIMIZERS
    lr: float = 1e-4  # peak learning rate
    steps: int = 100  # optimizer updates (the budget)
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per update
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"betas": [0.9, 0.99]}
    schedule: str = "constant"  # constant | cosine | linear (decay to 0 at the last step)
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast of forward passes; weights stay as loaded)
    seed: int = 0  # batch order, LoRA init, Hutchinson probes
    eval_every: int = 10  # held-out evaluation cadence in steps (also at step 0 and the last)
    train: str = "all"  # all | untouched (defended layers frozen) | lora
    frozen: tuple[str, ...] = ()  # extra parameter-name prefixes kept frozen (e.g. "layers.0")
    lora_targets: tuple[str, ...] = ("all-linear",)  # module names, or ("all-linear",)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    divergence_factor: float = 10.0  # train loss above this × the first one counts as diverged
    threshold: str | None = (
        None  # e.g. "harmful_accuracy>=0.9"; see specdef.attack.metrics.Threshold
    )
    stop_at_threshold: bool = False  # end the run at the first evaluation that meets it

    def __post_init__(self) -> None:
        get_optimizer_entry(self.optimizer)
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), f"lr > 0, found {self.lr}"),
            (self.steps >= 1, f"steps >= 1, found {self.steps}"),
            (self.batch_size >= 1, f"batch_size >= 1, found {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum >= 1, found {self.grad_accum}"),
            (self.eval_every >= 1, f"eval_every >= 1, found {self.eval_every}"),
            (self.warmup_steps >= 0, f"warmup_steps >= 0, found {self.warmup_steps}"),
            (self.schedule in SCHEDULES, f"schedule in {SCHEDULES}, found {self.schedule!r}"),
            (self.precision in PRECISIONS, f"precision in {PRECISIONS}, found {self.precision!r}"),
            (self.train in TRAIN_MODES, f"train in {TRAIN_MODES}, found {self.train!r}"),
            (self.divergence_factor > 1, f"divergence_factor > 1, found {self.divergence_factor}"),
            (
                self.grad_clip is None or self.grad_clip > 0,
                f"grad_clip > 0, found {self.grad_clip}",
            ),
            (self.lora_rank >= 1, f"lora_rank >= 1, found {self.lora_rank}"),
        ]
        for ok, what in checks:
            if not ok:
                raise SpecdefError(f"Invalid attack spec: expected {what}.")
        if self.threshold is None and self.stop_at_threshold:
            raise SpecdefError("stop_at_threshold needs a threshold; set threshold too.")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["optimizer_kwargs"] = dict(self.optimizer_kwargs)
        out["frozen"] = list(self.frozen)
        out["lora_targets"] = list(self.lora_targets)
        return out


@dataclass
class AttackResult:
    """What one attack measured. ``history``: one row per update (``step``, ``train_loss``,
    ``grad_norm``, ``lr``); ``evals``: one row per evaluation (``step``, then ``<split>_<metric>``
    such as ``harmful_loss``, ``harmful_accuracy``, ``benign_loss``). ``stopped_at``: the step at
    which ``on_eval`` ended the run early (a search's pruner). ``ladder``: the first step each rung
    of the threshold ladder was reached on the threshold's metric (else the task's default one)."""

    spec: AttackSpec
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    diverged_at: int | None
    steps_run: int
    trainable_parameters: int
    seconds: float
    outcome: StepsToThreshold | None = None
    stopped_at: int | None = None
    ladder: Ladder | None = None

    def summary(self) -> dict[str, Any]:
        last = self.evals[-1] if self.evals else {}
        out: dict[str, Any] = {
            "diverged_at": self.diverged_at,
            "steps_run": self.steps_run,
            "trainable_parameters": self.trainable_parameters,
            "seconds": round(self.seconds, 3),
            "final": {k: v for k, v in last.items() if k != "step"},
            "stopped_at": self.stopped_at,
        }
        if self.outcome is not None:
            out.update(self.outcome.to_dict())
        if self.ladder is not None:
            out["ladder"] = self.ladder.to_dict()
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "summary": self.summary(),
            "history": self.history,
            "evals": self.evals,
        }


def select_trainable_(model: nn.Module, spec: AttackSpec) -> nn.Module:
    """Set ``requires_grad`` per ``spec.train`` (injecting peft LoRA adapters for ``"lora"``) and
    freeze ``spec.frozen`` prefixes. Returns the model (the same object; LoRA is injected in place)."""
    if spec.train == "lora":
        model = _inject_lora_(model, spec)
    elif spec.train == "untouched":
        roles = parameter_roles(model)
        for name, p in model.named_parameters():
            p.requires_grad_(roles.get(name, "untouched") == "untouched")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    for name, p in model.named_parameters():
        if any(name == f or name.startswith(f + ".") for f in spec.frozen):
            p.requires_grad_(False)
    return model


def lora_target_modules(model: nn.Module, targets: tuple[str, ...]) -> str | list[str]:
    """Resolve LoRA targets. ``("all-linear",)`` is passed to peft as is: it adapts every
    ``nn.Linear`` — the inflated *and* the compensation children of defended layers. Any other name
    matches modules whose full name ends with it; a match on a defended layer (which is not an
    ``nn.Linear``) is redirected to its ``inflated`` child, the weight the release actually changed."""
    if tuple(targets) == ("all-linear",):
        return "all-linear"
    defended = _defended_names(model)
    names = [n for n, _ in model.named_modules() if n]
    resolved: list[str] = []
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise SpecdefError(
                f"LoRA target {target!r} matches no module; expected a module name suffix such as "
                f"{names[-1]!r}, or 'all-linear'."
            )
        resolved += [f"{n}.inflated" if n in defended else n for n in hits]
    return sorted(set(resolved))


def _defended_names(model: nn.Module) -> set[str]:
    return set(defended_layers(model))


def _inject_lora_(model: nn.Module, spec: AttackSpec) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=0.0,
        target_modules=lora_target_modules(model, spec.lora_targets),
    )
    return inject_adapter_in_model(config, model)


def lr_factor(spec: AttackSpec, step: int) -> float:
    """Multiplier of the peak learning rate for update ``step`` (1-based)."""
    if spec.warmup_steps and step <= spec.warmup_steps:
        return step / spec.warmup_steps
    if spec.schedule == "constant":
        return 1.0
    span = max(spec.steps - spec.warmup_steps, 1)
    progress = min(max(step - spec.warmup_steps, 0) / span, 1.0)
    if spec.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _evaluate(
    task: Task, model: nn.Module, splits: Mapping[str, Any], step: int
) -> dict[str, float]:
    row: dict[str, float] = {"step": step}
    for split, batches in splits.items():
        for metric, value in task.evaluate(model, batches).items():
            row[f"{split}_{metric}"] = float(value)
    return row


@torch.no_grad()
def evaluate_heldout(model: nn.Module, task: Task) -> dict[str, float]:
    """Every held-out metric of ``task`` on ``model`` (``<split>_<metric>``), exactly as a run's
    step-0 evaluation records it — e.g. a model's utility before a defense changed it."""
    device = next(model.parameters()).device
    splits = {k: [to_device(b, device) for b in v] for k, v in task.eval_splits().items()}
    training = model.training
    model.eval()
    try:
        row = _evaluate(task, model, splits, 0)
    finally:
        model.train(training)
    row.pop("step")
    return row


def run_attack(
    model: nn.Module,
    task: Task,
    spec: AttackSpec,
    *,
    accelerator: Any | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_eval: Callable[[dict[str, float]], bool] | None = None,
) -> AttackResult:
    """Fine-tune ``model`` on ``task`` as ``spec`` says; the model is trained **in place**.

    Seeds a forked RNG with ``spec.seed`` (the caller's global RNG state is untouched). Returns the
    per-step history, the evaluations, the threshold ladder and, if ``spec.threshold`` is set, the
    steps to reach it. ``on_eval`` sees each evaluation row after step 0; returning ``True`` ends
    the run there (``stopped_at``; what was not reached is censored at that step).
    """
    if not isinstance(task, Task):
        raise SpecdefError(f"Expected a specdef Task; found {type(task).__name__}.")
    entry = get_optimizer_entry(spec.optimizer)
    if spec.grad_clip is not None and (entry.needs_closure or entry.needs_create_graph):
        raise SpecdefError(
            f"grad_clip cannot be combined with {spec.optimizer!r}, which differentiates its "
            "gradients inside step(); drop grad_clip."
        )
    threshold = Threshold.parse(spec.threshold, task_kind=task.kind) if spec.threshold else None
    if _train_size(task) == 0:
        raise SpecdefError(
            f"Task {task.name!r} has no training examples (e.g. every example was longer than "
            "max_length and dropped); expected at least one: raise --max-length or pick a task."
        )
    device = accelerator.device if accelerator is not None else _model_device(model)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(spec.seed)
        model = select_trainable_(model, spec)
        optimizer, entry = make_optimizer(
            spec.optimizer,
            model,
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            kwargs=spec.optimizer_kwargs,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in params)
        rank, world = 0, 1
        if accelerator is not None:
            model = accelerator.prepare_model(model)
            rank, world = int(accelerator.process_index), int(accelerator.num_processes)
        backward: Callable[..., None] = (
            accelerator.backward if accelerator is not None else torch.Tensor.backward
        )
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
            if spec.precision == "bf16"
            else contextlib.nullcontext
        )
        stream = _shard(
            task.train_batches(batch_size=spec.batch_size * world, seed=spec.seed), rank, world
        )
        splits = {k: [to_device(b, device) for b in v] for k, v in task.eval_splits().items()}
        create_graph = entry.needs_create_graph

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for micro in micro_batches:
                with autocast():
                    loss = task.loss(model, micro) / spec.grad_accum
                with warnings.catch_warnings():
                    # create_graph's reference-cycle warning: the loop sets grads to None after
                    # every step, which breaks the cycle.
                    warnings.filterwarnings("ignore", message=".*create_graph=True.*")
                    backward(loss, create_graph=create_graph)
                total += loss.detach().float()
            return total

        history: list[dict[str, float]] = []
        evals: list[dict[str, float]] = []
        diverged_at: int | None = None
        stopped_at: int | None = None
        initial_loss: float | None = None
        start = time.perf_counter()
        model.eval()
        with autocast():
            evals.append(_evaluate(task, model, splits, 0))
        model.train()
        step = 0
        for step in range(1, spec.steps + 1):
            factor = lr_factor(spec, step)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            micro_batches = [to_device(next(stream), device) for _ in range(spec.grad_accum)]
            if entry.needs_batch:
                _observe(optimizer, task, micro_batches)
            if entry.needs_closure:
                loss_value = float(optimizer.step(closure))
                grad_norm = _grad_norm(params, None)
            else:
                loss_value = float(closure())
                grad_norm = _grad_norm(params, spec.grad_clip)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # also frees create_graph graphs
            row = {"step": step, "train_loss": loss_value, "grad_norm": grad_norm}
            row["lr"] = spec.lr * factor
            history.append(row)
            if on_step is not None:
                on_step(row)
            if initial_loss is None:
                initial_loss = loss_value
            if not math.isfinite(loss_value) or (
                loss_value > spec.divergence_factor * max(initial_loss, 1e-12)
            ):
                diverged_at = step
                break
            if step % spec.eval_every == 0 or step == spec.steps:
                model.eval()
                with autocast():
                    evals.append(_evaluate(task, model, splits, step))
                model.train()
                if not all(math.isfinite(v) for k, v in evals[-1].items() if k.endswith("loss")):
                    diverged_at = step
                    break
                if (
                    spec.stop_at_threshold
                    and threshold
                    and threshold.met(evals[-1].get(threshold.metric, math.nan))
                ):
                    break
                if on_eval is not None and on_eval(evals[-1]) and step < spec.steps:
                    stopped_at = step
                    break
        seconds = time.perf_counter() - start
        model.eval()
    if diverged_at is not None:
        log.info("attack %s lr=%g diverged at step %d", spec.optimizer, spec.lr, diverged_at)
    # a run stopped from outside is censored at the steps it ran, not at the budget it never used
    budget = stopped_at if stopped_at is not None else spec.steps
    stopped = stopped_at is not None
    outcome = (
        steps_to_threshold(
            evals, threshold, budget=budget, diverged_at=diverged_at, stopped=stopped
        )
        if threshold is not None
        else None
    )
    metric = threshold.metric if threshold is not None else DEFAULT_METRIC.get(task.kind, "")
    ladder = threshold_ladder(
        evals, metric=metric, budget=budget, diverged_at=diverged_at, stopped=stopped
    )
    return AttackResult(
        spec, history, evals, diverged_at, step, n_trainable, seconds, outcome, stopped_at, ladder
    )


def _observe(optimizer: Any, task: Task, batches: list[Batch]) -> None:
    if not isinstance(optimizer, BatchAware):
        raise SpecdefError(
            f"Optimizer {type(optimizer).__name__} is registered with needs_batch but has no "
            "observe(task, batches); fix its registry entry."
        )
    optimizer.observe(task, batches)


def _shard(stream: Iterator[Batch], rank: int, world: int) -> Iterator[Batch]:
    """Process ``rank``'s slice of every batch of a global stream (the whole batch for one process)."""
    for batch in stream:
        if world == 1:
            yield batch
            continue
        size = next(iter(batch.values())).shape[0]
        per = -(-size // world)
        yield {key: value[rank * per : (rank + 1) * per] for key, value in batch.items()}


@torch.no_grad()
def _grad_norm(params: list[nn.Parameter], clip: float | None) -> float:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if clip is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def _train_size(task: Task) -> int | None:
    """Training examples of the stock tasks (``None`` when a task does not say)."""
    train = getattr(task, "train", None)
    if isinstance(train, tuple) and len(train) == 2:
        return len(train[1])
    return len(train) if isinstance(train, list) else None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
