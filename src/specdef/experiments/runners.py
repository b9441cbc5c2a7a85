"""What one resolved run (:class:`specdef.experiments.config.RunSpec`) of each kind does. Composition only:
models and tasks come from :mod:`specdef.zoo`, the defense from :mod:`specdef.defense.apply`, attacks from
:mod:`specdef.attack.loop` (and :mod:`specdef.informed.transforms`), curvature from :mod:`specdef.curvature` and
:mod:`specdef.defense.certify`. Each function returns the outcome fields of one results row
(``docs/ARCHITECTURE.md``, "Results rows"); :func:`specdef.experiments.run.run_experiment` adds the
spec, ``run_id`` and provenance.

A run's ``model`` is a zoo name, or a mapping ``{name, architecture, <kwargs>}`` built by
:func:`specdef.architectures.build_architecture` (seeded by the run's seed; tiny models whose
dense Hessian fits in memory). Either is optionally pre-trained with ``data.pretrain`` (an attack
spec run on ``data.pretrain_task`` by the one attack loop, seeded by the run's seed), so curvature
is measured, or an attack starts, at a trained point (``tiny-llama-perm`` on ``perm-benign``).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdef import curvature
from specdef.architectures import build_architecture
from specdef.attack.loop import AttackSpec, run_attack, select_trainable_
from specdef.defense import certify as certified
from specdef.defense import probe as probing
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import count_parameters, defended_layers, linear_form
from specdef.defenses.data import model_kind
from specdef.defenses.registry import make_config
from specdef.defenses.run import apply_named, is_registry_defense
from specdef.errors import SpecdefError, did_you_mean
from specdef.informed.transforms import apply_adaptive
from specdef.io.checkpoint import MANIFEST
from specdef.io.checkpoint import load_tokenizer as checkpoint_tokenizer
from specdef.linalg import spectral
from specdef.native.apply import apply_native_
from specdef.release.sources import load_source
from specdef.tasks import Batch, Task, check_compatible
from specdef.utils.devices import to_device
from specdef.utils.dtypes import dtype_named
from specdef.zoo import TASKS, check_pairing, load_model, load_task, load_tokenizer, model_names

log = logging.getLogger(__name__)


def model_name(model: str | Mapping[str, Any]) -> str:
    return model if isinstance(model, str) else str(model.get("name", model.get("architecture")))


@functools.lru_cache(maxsize=2)
def _cached_zoo_model(name: str, attn_implementation: str | None) -> nn.Module:
    """A zoo model, or the Hugging Face directory / specdef checkpoint at path ``name`` (float32)."""
    if Path(name).is_dir():
        source = load_source(name, dtype=torch.float32, attn_implementation=attn_implementation)
        return source.model
    return load_model(name, attn_implementation=attn_implementation)


def check_model(model: str | Mapping[str, Any]) -> None:
    """Refuse (one line) a ``model:`` that is neither a zoo name nor a directory specdef loads
    (a Hugging Face directory with config.json, or a specdef checkpoint)."""
    if not isinstance(model, str):
        return
    path = Path(model)
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / MANIFEST).is_file()):
            raise SpecdefError(
                f"model {model!r} is a directory without config.json or {MANIFEST}; pass a "
                "Hugging Face model directory, a specdef checkpoint or a zoo model name."
            )
        return
    if model not in model_names():
        raise SpecdefError(
            did_you_mean(model, model_names(), what="model")
            + " (or a Hugging Face model directory / specdef checkpoint that exists)."
        )


_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("specdef_run_device", default="cpu")


@contextlib.contextmanager
def on_device(device: torch.device) -> Any:
    """Run every experiment run inside on ``device``: :func:`load_run_model` puts the model
    there, and probe / training / Hessian batches follow the model."""
    token = _DEVICE.set(str(device))
    try:
        yield
    finally:
        _DEVICE.reset(token)


def load_run_model(run: Any) -> nn.Module:
    """A fresh copy of the run's model in float32 (zoo models are loaded once per process),
    pre-trained by ``data.pretrain`` when the config asks for it, on the device of
    :func:`on_device` (the CPU by default)."""
    return load_run_model_pretrained(run)[0]


def load_run_model_pretrained(run: Any) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_run_model` and what its pre-training measured last (``{}`` without
    ``data.pretrain``): the held-out metrics of ``data.pretrain_task``, for the results row."""
    spec = run.model
    if isinstance(spec, str):
        attn = run.data.get("attn_implementation")
        model = copy.deepcopy(_cached_zoo_model(spec, attn))
    else:
        kwargs = {k: v for k, v in spec.items() if k not in ("name", "architecture")}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed)
            model = build_architecture(str(spec["architecture"]), **kwargs)
    measured: dict[str, Any] = {}
    pretrain = run.data.get("pretrain")
    if pretrain:
        task = load_run_task(run, name=run.data.get("pretrain_task", run.task))
        check_compatible(model, task, model_name=f"model {model_name(spec)!r}")
        result = run_attack(model, task, AttackSpec(**{**pretrain, "seed": run.seed}))
        measured = dict(result.summary()["final"])
    model.eval()
    return model.to(torch.device(_DEVICE.get())), measured


def load_run_task(run: Any, *, name: str | None = None) -> Task:
    """The run's task (or task ``name``) with ``data.max_length`` / ``eval_limit`` / ``fallback``;
    language tasks are tokenized with the run model's tokenizer."""

    task_name = name or run.task
    kwargs = tuple(
        (k, run.data[k]) for k in ("max_length", "eval_limit", "fallback") if k in run.data
    )  # data.eval_splits: keep only these held-out splits
    tokenizer = None
    if task_name in TASKS and TASKS[task_name].kind == "causal-lm" and TASKS[task_name].tokenized:
        tokenizer = model_name(run.model)
    task = _cached_task(task_name, tokenizer, kwargs)
    train = getattr(task, "train", None)
    if train is not None and len(train) == 0:  # an empty stream would never yield a batch
        raise SpecdefError(
            f"Task {task_name!r} has no training examples with {dict(kwargs)}; every example was "
            "dropped (e.g. prompts longer than max_length): raise data.max_length."
        )
    keep = run.data.get("eval_splits")
    if keep and name is None:  # evaluate only these held-out splits (CPU budget)
        heldout = getattr(task, "heldout", {})
        missing = [k for k in keep if k not in heldout]
        if missing:
            raise SpecdefError(
                f"eval_splits {missing} not in task {task_name!r}; available: {sorted(heldout)}."
            )
        task = dataclasses.replace(task, heldout={k: heldout[k] for k in keep})  # type: ignore[type-var]
    return task


@functools.lru_cache(maxsize=4)
def _cached_task(name: str, tokenizer: str | None, kwargs: tuple[tuple[str, Any], ...]) -> Task:

    extra: dict[str, Any] = dict(kwargs)
    if tokenizer is not None:
        found = (
            checkpoint_tokenizer(tokenizer)
            if Path(tokenizer).is_dir()
            else load_tokenizer(tokenizer)
        )
        if found is None:
            raise SpecdefError(
                f"Task {name!r} needs a tokenizer, and {tokenizer!r} has none; save one beside "
                "the model (tokenizer.json)."
            )
        extra["tokenizer"] = found
    return load_task(name, **extra)


MODES = ("algorithm1", "native")  # defense.mode: Algorithm 1 (default) or native deformation


def defend(model: nn.Module, defense: Mapping[str, Any], *, probe: Any = None) -> Any:
    """Apply SpecDef (Algorithm 1) with the run's defense fields; returns the defense report."""

    return apply_specdef_(
        model, SpecDefConfig.from_dict(defense, also=("mode", "name")), probe=probe
    )


def _defense_summary(report: Any) -> dict[str, Any]:
    return {
        "layers": len(report.layers),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "max_reconstruction_error": report.max_reconstruction_error,
    }


def defend_summary(model: nn.Module, defense: Mapping[str, Any]) -> dict[str, Any]:
    """Defend in place by ``defense.mode`` (``algorithm1``: :func:`apply_specdef_`; ``native``:
    :func:`specdef.native.apply.apply_native_` along the architecture's symmetries, all pairs unless
    ``defense.targets`` names some) and return the summary a results row carries."""
    mode = str(defense.get("mode", "native" if defense.get("name") == "native" else "algorithm1"))
    if mode not in MODES:
        raise SpecdefError(did_you_mean(mode, MODES, what="defense mode"))
    # α, top-k, method validated once, for both modes
    config = SpecDefConfig.from_dict(defense, also=("mode", "name"))
    if mode == "algorithm1":
        return {"mode": mode, **_defense_summary(apply_specdef_(model, config))}
    before = count_parameters(model)
    records = apply_native_(model, config)  # targets default "all-linear": every pair
    return {
        "mode": mode,
        "layers": len(records),
        "params_before": before,
        "params_after": count_parameters(model),
        "max_reconstruction_error": max((r.product_error for r in records), default=0.0),
    }


def defend_run_(model: nn.Module, run: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Apply the run's defense: a registry defense named by ``defense.name`` (through
    :func:`specdef.defenses.run.apply_named`, on the run's data and seed), else SpecDef's own
    fields (:func:`defend_summary`). Returns the defended model and the row's ``defense_report``."""
    if not is_registry_defense(run.defense):
        return model, defend_summary(model, run.defense)
    before = count_parameters(model)
    tokenizer = load_tokenizer(model_name(run.model)) if model_kind(model) == "causal-lm" else None
    defended = apply_named(model, run.defense, tokenizer=tokenizer, seed=run.seed)
    record = defended.record
    measured = record.get("unlearning") or record
    return defended.model, {
        "name": record["name"],
        "params_before": before,
        "params_after": count_parameters(defended.model),
        "layers": len(defended_layers(defended.model)),
        "before": measured.get("before"),
        "after": measured.get("after"),
        "training": measured.get("training"),
    }


@dataclass(frozen=True)
class Prepared:
    """The model an attacker faces (loaded, defended, transformed) and what that cost."""

    model: nn.Module
    fields: dict[str, Any]  # row fields: alpha, defense_report, adaptive, cost, parameters
    frozen: tuple[str, ...] = ()  # parameter prefixes the transform froze
    train: str = "all"  # the AttackSpec.train mode the transform implies


def prepare(run: Any, model: nn.Module | None = None) -> Prepared:
    """Load the run's model (or take ``model``), defend it unless ``alpha`` is null, apply the
    informed transform ``attack.adaptive``; ``parameters`` counts the original, released and
    attacked model."""
    pretrained: dict[str, Any] = {}
    if model is None:
        model, pretrained = load_run_model_pretrained(run)
    original = count_parameters(model)
    fields: dict[str, Any] = {"alpha": run.defense.get("alpha")}
    if pretrained:
        fields["pretrain"] = pretrained  # held-out metrics after data.pretrain
    if run.defended:
        model, fields["defense_report"] = defend_run_(model, run)
    released = count_parameters(model)
    adaptive = run.attack.get("adaptive")
    fields["adaptive"] = adaptive
    frozen: tuple[str, ...] = ()
    train = "all"
    if adaptive:
        model, record = apply_adaptive(model, str(adaptive))
        fields["cost"] = record.to_dict()
        frozen, train = tuple(record.frozen), record.train
    fields["parameters"] = {
        "original": original,
        "released": released,
        "attacked": count_parameters(model),
    }
    return Prepared(model, fields, frozen, train)


# ---- attack ------------------------------------------------------------------------------------


def attack_spec(run: Any, prepared: Prepared | None = None) -> AttackSpec:
    """The run's :class:`AttackSpec` (seeded by the run's seed), with what the informed transform
    of ``prepared`` froze kept frozen and its training mode."""
    attack = {k: v for k, v in run.attack.items() if k != "adaptive"}
    if prepared is not None:
        attack["frozen"] = [*attack.get("frozen", ()), *prepared.frozen]
        if prepared.train != "all":
            attack["train"] = prepared.train
    for key in ("frozen", "lora_targets"):
        if isinstance(attack.get(key), list | str):
            value = attack[key]
            attack[key] = (value,) if isinstance(value, str) else tuple(value)
    return AttackSpec(**{**attack, "seed": run.seed})


def run_attack_kind(run: Any) -> dict[str, Any]:
    """Load, defend (unless ``alpha`` is null), apply the informed transform (``attack.adaptive``),
    fine-tune with the one attack loop; the row carries the full :class:`AttackResult`. A
    transform that leaves nothing to train (``untouched`` with every layer defended) is a measured
    outcome, ``error: "nothing to train"``, not a failed run."""

    prepared = prepare(run)
    task = load_run_task(run)
    check_compatible(prepared.model, task, model_name=f"model {model_name(run.model)!r}")
    out: dict[str, Any] = {**prepared.fields, "task_kind": task.kind}
    spec = attack_spec(run, prepared)
    if spec.train != "lora":  # LoRA adds its trainable adapters inside the loop
        select_trainable_(prepared.model, spec)
        if not any(p.requires_grad for p in prepared.model.parameters()):
            return {**out, "error": "nothing to train", "trainable_parameters": 0}
    result = run_attack(prepared.model, task, spec)
    out.update(result.to_dict())
    return out


# ---- curvature ---------------------------------------------------------------------------------


def _batches(task: Task, run: Any) -> list[Batch]:
    size = int(run.measure.get("batch_size", 64))
    stream = task.train_batches(batch_size=size, seed=run.seed)
    return [next(stream) for _ in range(int(run.measure.get("batches", 1)))]


def _to_dtype(batches: list[Batch], dtype: torch.dtype) -> list[Batch]:
    """``batches`` in ``dtype`` (floating tensors), on the run's device."""
    device = torch.device(_DEVICE.get())
    return [
        {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in b.items()}
        for b in batches
    ]


def run_curvature_kind(run: Any) -> dict[str, Any]:
    """σ₁(H) of the training loss (float64): exact from the dense Hessian when it fits, Lanczos
    estimate, and the certified lower bounds of :mod:`specdef.defense.certify`."""

    model = load_run_model(run)
    out: dict[str, Any] = {"alpha": run.defense.get("alpha")}
    if run.defended and is_registry_defense(run.defense):  # trains in the data's float32 first
        model, out["defense_report"] = defend_run_(model, run)
    model = model.double()
    task = load_run_task(run)
    batches = _to_dtype(_batches(task, run), torch.float64)
    if run.defended and not is_registry_defense(run.defense):
        out["defense_report"] = _defense_summary(defend(model, run.defense))
    n_params = sum(p.numel() for p in model.parameters())
    out["parameters"] = n_params
    exact = None
    if n_params <= int(run.measure.get("max_dense", curvature.estimators.MAX_DENSE_PARAMETERS)):
        hess = curvature.dense_hessian(model, task.loss, batches)
        eig = torch.linalg.eigvalsh(hess)
        exact = float(eig.abs().max())
        out["lambda_max_exact"] = float(eig.max())
    out["sigma1_exact"] = exact
    op = curvature.HessianOperator(model, task.loss, batches)
    est = curvature.lanczos(
        op, k=1, which="LM", max_iter=int(run.measure.get("lanczos_iter", 60)), seed=run.seed
    )
    out["sigma1"] = float(abs(est.eigenvalues[0]))
    bounds: dict[str, float] = {}
    if defended_layers(model):  # the SpecDef-aware bounds need compensation layers
        bounds.update(_certified_bounds(model, task, batches, run))
    reference = exact if exact is not None else out["sigma1"]
    out["bounds"] = bounds
    out["bounds_hold"] = all(b <= reference * (1 + 1e-8) for b in bounds.values())
    out["lr_ceiling"] = 2.0 / reference if reference > 0 else math.inf
    out["hvps"] = op.hvps
    return out


def _certified_bounds(
    model: nn.Module, task: Task, batches: list[Batch], run: Any
) -> dict[str, float]:
    """The curvature issue's certified lower bounds on σ₁(H) of a defended model: the
    weight-spectrum bound, the Rayleigh/Ritz certificate, and the top Ritz value of the
    compensation block (Poincaré separation: a Rayleigh quotient of a principal block)."""

    spectral = certified.spectral_lower_bound(model, task.loss, batches)
    certificate = certified.defense_certificate(model, task.loss, batches, spectral=spectral)
    rows = [f"{name}.compensation.weight" for name in defended_layers(model)]
    block = curvature.lanczos(
        curvature.HessianOperator(model, task.loss, batches, rows=rows),
        k=1,
        which="LA",
        max_iter=int(run.measure.get("lanczos_iter", 60)),
        seed=run.seed,
    )
    return {
        "spectral": spectral.value,
        "rayleigh": certificate.value,
        "block": float(block.eigenvalues[0]),
    }


# ---- utility -----------------------------------------------------------------------------------


def _probe(task: Task, run: Any) -> Any:
    split = str(run.measure.get("probe_split", "benign"))
    splits = task.eval_splits()
    if split not in splits:
        raise SpecdefError(f"Probe split {split!r} not in task {task.name!r}: {sorted(splits)}.")
    batch = to_device(splits[split][0], torch.device(_DEVICE.get()))
    if "x" in batch:
        return batch["x"]
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _cast_probe(probe: Any, dtype: torch.dtype) -> Any:
    if isinstance(probe, torch.Tensor):
        return probe.to(dtype)
    return probe


def _metrics(task: Task, model: nn.Module, run: Any, dtype: torch.dtype) -> dict[str, float]:
    out: dict[str, float] = {}
    for split, batches in task.eval_splits().items():
        if split not in run.measure.get("splits", [split]):
            continue
        cast = _to_dtype(list(batches), dtype)
        for metric, value in task.evaluate(model, cast).items():
            out[f"{split}_{metric}"] = float(value)
    return out


def run_utility_kind(run: Any) -> dict[str, Any]:
    """Defend in ``measure.dtype``: does the precision guard accept it, what is the function gap
    (max |Δoutput| / max |output| on a held-out probe batch), and how do metrics move?"""

    dtype_name = str(run.measure.get("dtype", "fp32"))
    dtype = dtype_named(dtype_name)
    model = load_run_model(run).to(dtype)
    task = load_run_task(run)
    probe = _cast_probe(_probe(task, run), dtype)
    out: dict[str, Any] = {"alpha": run.defense.get("alpha"), "dtype": dtype_name}
    out["metrics_before"] = _metrics(task, model, run, dtype)
    reference = probing.model_output(model, probe).double()
    original = copy.deepcopy(model)  # the dense error below needs each layer's undefended W
    try:
        report = defend(model, run.defense, probe=probe)
        out["guard_accepted"], out["guard_message"] = True, None
    except SpecdefError as err:
        if "Precision guard" not in str(err):
            raise
        out["guard_accepted"], out["guard_message"] = False, str(err)
        report = defend(model, {**run.defense, "force": True}, probe=probe)
    out["defense_report"] = _defense_summary(report)
    # the column E7 documents: the dense ‖C·W̃ − W‖/‖W‖ in the dtype (the guard's own figure is
    # its probe estimate, report.max_reconstruction_error, kept in defense_report)
    out["reconstruction_error"] = max(
        (
            spectral.reconstruction_error(
                linear_form(original.get_submodule(name))[0],
                layer.inflated.weight,
                layer.compensation.weight,
                dtype=dtype,
            )
            for name, layer in defended_layers(model).items()
        ),
        default=0.0,
    )
    del original
    after = probing.model_output(model, probe).double()
    scale = float(reference.abs().max())
    out["function_gap"] = float((after - reference).abs().max()) / max(scale, 1e-30)
    out["metrics_after"] = _metrics(task, model, run, dtype)
    return out


_DEFENSE_KEYS = {f.name for f in dataclasses.fields(SpecDefConfig)} | {"mode", "name"}
_ATTACK_KEYS = {f.name for f in dataclasses.fields(AttackSpec)} | {"adaptive"}


def validate_runs(runs: Sequence[Any]) -> None:
    """Check every expanded run's defense and attack fields — names (with "did you mean") and
    values, through the same :class:`SpecDefConfig` / :class:`AttackSpec` the runs will build — so
    a bad value late in a grid fails before anything is written, not after the first rows."""
    for number, run in enumerate(runs, start=1):
        where = f"run {number} ({run.run_id})"
        try:
            check_model(run.model)
            if isinstance(run.model, str) and run.model in model_names():
                check_pairing(run.model, run.task)
        except SpecdefError as err:
            raise SpecdefError(f"{where}: {err}") from None
        defense = dict(run.defense)
        if is_registry_defense(defense):
            try:
                make_config(str(defense["name"]), {k: v for k, v in defense.items() if k != "name"})
            except SpecdefError as err:
                raise SpecdefError(f"{where}: {err}") from None
        elif defense.get("alpha") is not None:
            for key in defense:
                if key not in _DEFENSE_KEYS:
                    raise SpecdefError(
                        f"{where}: " + did_you_mean(key, sorted(_DEFENSE_KEYS), what="defense key")
                    )
            mode = str(defense.get("mode", "algorithm1"))
            if mode not in MODES:
                raise SpecdefError(f"{where}: " + did_you_mean(mode, MODES, what="defense mode"))
            try:
                SpecDefConfig.from_dict(defense, also=("mode", "name"))
            except SpecdefError as err:
                raise SpecdefError(f"{where}: {err}") from None
            except TypeError as err:
                raise SpecdefError(
                    f"{where}: defense has a value of the wrong type ({err})."
                ) from None
        if getattr(run, "kind", None) != "attack":
            continue
        for key in run.attack:
            if key not in _ATTACK_KEYS:
                raise SpecdefError(
                    f"{where}: " + did_you_mean(key, sorted(_ATTACK_KEYS), what="attack key")
                )
        try:
            attack_spec(run)
        except SpecdefError as err:
            raise SpecdefError(f"{where}: {err}") from None
        except (TypeError, ValueError) as err:
            raise SpecdefError(f"{where}: attack has a value of the wrong type ({err}).") from None
