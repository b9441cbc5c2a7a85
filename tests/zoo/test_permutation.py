"""The permutation tasks (``perm-benign``, ``perm-harmful``) against their definition, checked here
from the token ids alone: A is a permutation, H is A with exactly the successors of a 16-token set
permuted among themselves, every sequence follows its language, the splits are fixed."""

from __future__ import annotations

import itertools

import pytest

from specdef import zoo
from specdef.zoo import permutation


def _successors(examples: list[dict[str, list[int]]]) -> dict[int, int]:
    table: dict[int, int] = {}
    for example in examples:
        ids = example["input_ids"]
        assert example["labels"] == ids and len(ids) == permutation.LENGTH
        for a, b in itertools.pairwise(ids):
            assert table.setdefault(a, b) == b, f"token {a} has two successors"
    return table


def test_languages_are_permutations_differing_on_a_shuffled_set():
    lang_a, lang_h = permutation.languages()
    assert sorted(lang_a.tolist()) == sorted(lang_h.tolist()) == list(range(permutation.VOCAB))
    changed = [t for t in range(permutation.VOCAB) if lang_a[t] != lang_h[t]]
    assert 0 < len(changed) <= permutation.SHUFFLED
    # H only re-deals the successors of the changed tokens among themselves
    assert sorted(lang_h[changed].tolist()) == sorted(lang_a[changed].tolist())


@pytest.mark.parametrize(
    ("name", "split"), [("perm-benign", "benign"), ("perm-harmful", "harmful")]
)
def test_every_sequence_follows_its_language(name, split):
    task = zoo.load_task(name)
    lang_a, lang_h = permutation.languages()
    train = _successors(task.train)
    language = lang_a if name == "perm-benign" else lang_h
    assert all(language[a] == b for a, b in train.items())
    assert all(language[a] == b for a, b in _successors(task.heldout[split]).items())
    assert len(task.train) == permutation.TRAIN and task.pad_id == 0
    assert {k: len(v) for k, v in task.heldout.items()} == {"harmful": 64, "benign": 64}


def test_both_tasks_share_their_held_out_splits_and_are_fixed():
    benign, harmful = zoo.load_task("perm-benign"), zoo.load_task("perm-harmful")
    assert benign.heldout == harmful.heldout
    assert zoo.task_digest(benign) == zoo.task_digest(zoo.load_task("perm-benign"))
    assert len(zoo.load_task("perm-harmful", eval_limit=5).heldout["harmful"]) == 5
    assert zoo.TASKS["perm-harmful"].kind == "causal-lm"
    assert "specdef/zoo/permutation.py" in zoo.TASKS["perm-harmful"].source


def test_the_permutation_model_reads_the_tasks_ids_and_has_no_tokenizer():
    model = zoo.load_model("tiny-llama-perm")
    assert model.config.vocab_size == permutation.VOCAB
    assert zoo.load_tokenizer("tiny-llama-perm") is None
    task = zoo.load_task("perm-harmful")
    loss = task.evaluate(model, task.eval_splits()["harmful"])["loss"]
    # random init: about the uniform loss log(64) ≈ 4.16 nats, far above the attack threshold 0.5
    assert 3.5 < loss < 5.0
