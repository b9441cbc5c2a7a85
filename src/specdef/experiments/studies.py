"""The two kinds the informed-attacker studies add (``docs/results/informed_attacks.md``,
``docs/results/native_vs_algorithm1.md``); each returns the outcome fields of one results row.

- ``detection``: defend a model (or not), then run :func:`specdef.informed.detect.detect` on its
  linear weights without the manifest and score the pairs it reports against the defended layers
  (``measure.view: renamed`` hides module names and order: weights become ``w0, w1, …`` in a
  shuffled order);
- ``landscape``: what the attacker faces before training — the model defended by ``defense.mode``
  (Algorithm 1 or native) and transformed by ``attack.adaptive``: its size, its function gap to
  the undefended model, σ₁(H) of the training loss on one batch (Lanczos), and the native
  imbalance. Its attack runs are an ordinary ``attack`` config with the same variants.
"""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any

import torch
from torch import nn

from specdef.curvature import HessianOperator, lanczos
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError, did_you_mean
from specdef.experiments.runners import defend_summary, load_run_model, load_run_task, prepare
from specdef.informed.detect import detect, detect_model, linear_weights
from specdef.native.apply import native_imbalance
from specdef.utils.devices import to_device

VIEWS = ("model", "renamed")  # detection on the live model's layers, or on anonymous tensors
HESSIAN_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def run_detection_kind(run: Any) -> dict[str, Any]:
    """Defend (unless ``alpha`` is null), detect from the weights alone, compare with the truth:
    ``true_positives`` / ``false_positives`` / ``false_negatives`` count (inflated, compensation)
    pairs; ``suspects`` and ``unpaired_compensations`` are reported separately (each one is a
    false positive on a model whose every defended layer was found). ``seconds``: detection only."""
    view = str(run.measure.get("view", "model"))
    if view not in VIEWS:
        raise SpecdefError(did_you_mean(view, VIEWS, what="detection view"))
    model = load_run_model(run)
    out: dict[str, Any] = {"alpha": run.defense.get("alpha"), "view": view}
    if run.defended:
        out["defense_report"] = defend_summary(model, run.defense)
    truth = {(f"{n}.inflated", f"{n}.compensation") for n in defended_layers(model)}
    start = time.perf_counter()
    if view == "renamed":
        weights = linear_weights(model)
        names = sorted(weights, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
        alias = {n: f"w{i}" for i, n in enumerate(names)}
        found = detect({alias[n]: weights[n] for n in names})
        truth = {(alias[a], alias[b]) for a, b in truth}
    else:
        found = detect_model(model)
    seconds = time.perf_counter() - start
    got = {(p.inflated, p.compensation) for p in found.pairs}
    out.update(
        truth=len(truth),
        true_positives=len(got & truth),
        false_positives=len(got - truth),
        false_negatives=len(truth - got),
        suspects=len(found.suspects),
        unpaired_compensations=len(found.unpaired_compensations),
        layers=len(found.layers),
        seconds=seconds,
        min_alignment=min((p.alignment for p in found.pairs), default=None),
        alpha_estimates=sorted({round(p.alpha, 1) for p in found.pairs}),
    )
    return out


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    batch = to_device(batch, next(model.parameters()).device)
    if "x" in batch:
        return model(batch["x"]).double()
    ids = batch["input_ids"]
    return model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.double()


def sigma1(model: nn.Module, task: Any, run: Any) -> dict[str, Any]:
    """Largest |eigenvalue| of the training-loss Hessian on one batch of ``measure.batch_size``
    (Lanczos, ``measure.lanczos_iter`` products, tol 1e-6), on a copy of ``model`` cast to
    ``measure.hessian_dtype`` (float64 unless the model is too large for a float64 double
    backward). With few iterations a Ritz value is a lower bound on σ₁."""
    name = str(run.measure.get("hessian_dtype", "float64"))
    if name not in HESSIAN_DTYPES:
        raise SpecdefError(did_you_mean(name, HESSIAN_DTYPES, what="hessian dtype"))
    dtype = HESSIAN_DTYPES[name]
    model = copy.deepcopy(model).to(dtype)
    batch = next(
        task.train_batches(batch_size=int(run.measure.get("batch_size", 256)), seed=run.seed)
    )
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    op = HessianOperator(model, task.loss, [batch])
    iters = int(run.measure.get("lanczos_iter", 80))
    res = lanczos(op, k=1, which="LM", max_iter=iters, tol=1e-6, seed=run.seed)
    return {
        "sigma1": float(abs(res.eigenvalues[0])),
        "hvps": res.hvps,
        "converged": res.converged,
        "hessian_dtype": name,
    }


def run_landscape_kind(run: Any) -> dict[str, Any]:
    """The model the attacker faces (defended by ``defense.mode``, transformed by
    ``attack.adaptive``): ``parameters``, ``function_gap`` (max |Δlogit| / max |logit| against the
    undefended model on the first held-out batch, in the model's dtype), ``sigma1`` and
    ``imbalance_log10`` (the largest native imbalance; absent while Algorithm 1 compensation
    layers are present, which rebalance cannot read)."""
    task = load_run_task(run)
    reference_model = load_run_model(run)
    probe = next(iter(task.eval_splits().values()))[0]
    with torch.no_grad():
        reference = _logits(reference_model, probe)
    del reference_model
    prepared = prepare(run)
    model = prepared.model
    out: dict[str, Any] = dict(prepared.fields)
    with torch.no_grad():
        gap = (_logits(model, probe) - reference).abs().max() / reference.abs().max()
    out["function_gap"] = float(gap)
    if not defended_layers(model):
        out["imbalance_log10"] = max(native_imbalance(model).values())
    out.update(sigma1(model, task, run))
    return out
