"""Held-out metrics of a zoo model on a zoo task (``specdef zoo eval``): the figures in DATA.md."""

from __future__ import annotations

import os
from typing import Any

from specdef.errors import SpecdefError
from specdef.utils.progress import track
from specdef.zoo.datasets import TASKS, load_task
from specdef.zoo.models import load_model, load_tokenizer, model_info

DEFAULT_TASK = {"causal-lm": "benign-text", "vision": "digits-benign"}


def evaluate_zoo_model(
    name: str,
    task: str | None = None,
    *,
    max_length: int = 256,
    eval_limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """``{"model", "task", "splits": {split: {"loss", "perplexity" | "accuracy", "examples"}}}``
    for every held-out split of ``task`` (default: ``benign-text`` for language models,
    ``digits-benign`` for vision models)."""
    info = model_info(name)
    task = task or DEFAULT_TASK.get(info.kind)
    if task is None:
        raise SpecdefError(
            f"Model {name!r} ({info.kind}) has no zoo task to evaluate on; evaluate a "
            "causal-lm or vision model instead."
        )
    wanted = "classification" if info.kind == "vision" else "causal-lm"
    if task in TASKS and TASKS[task].kind != wanted:
        raise SpecdefError(
            f"Task {task!r} is a {TASKS[task].kind} task but model {name!r} needs a {wanted} task; "
            f"choose one of: {', '.join(t for t, i in TASKS.items() if i.kind == wanted)}."
        )
    tokenizer = load_tokenizer(name, cache_dir=cache_dir) if wanted == "causal-lm" else None
    loaded = load_task(task, tokenizer=tokenizer, max_length=max_length, eval_limit=eval_limit)
    model = load_model(name, cache_dir=cache_dir)
    splits: dict[str, Any] = {}
    for split, batches in track(list(loaded.eval_splits().items()), f"eval {name}"):
        metrics = loaded.evaluate(model, batches)
        count = sum(len(b["y"] if "y" in b else b["input_ids"]) for b in batches)
        splits[split] = {**metrics, "examples": count}
    return {"model": name, "task": loaded.name, "max_length": max_length, "splits": splits}
