"""The recipe-trained language model of the zoo: exact compact training, a real language model (held-out
perplexity far below a unigram model of the same data) and a subject an attack can train.

The first test needing the trained model builds it (about a minute on one idle core, once per
cache); the exactness test builds nothing.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from specdef import zoo
from specdef.attack.loop import AttackSpec, run_attack
from specdef.cli import main
from specdef.zoo import language

NAME = "llama-tiny-benign"
RECIPE = language.RECIPES[NAME]


def test_compact_softmax_is_the_full_models_softmax():
    """The recipe's training loss (compact vocabulary + one shared unseen row, offset by
    log(#unseen)) equals the expanded model's cross-entropy over all 49,152 tokens (float64)."""
    tiny = replace(RECIPE, hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1)
    seen = torch.tensor([1, 2, 7, 300, 4096, 49151])
    compact = language._llama(tiny.config(len(seen) + 1), seed=3).double()
    full = language.expand(compact, seen, tiny).double()
    assert full.lm_head.weight is full.model.embed_tokens.weight
    ids = torch.tensor(
        [[0, 1, 2, 3, 4, 5], [5, 5, 0, 2, 1, 4]]
    )  # compact ids (never the unseen row)
    offset = torch.zeros(len(seen) + 1, dtype=torch.float64)
    offset[-1] = math.log(language.VOCAB_SIZE - len(seen))
    with torch.no_grad():
        compact_logp = (compact(input_ids=ids).logits + offset).log_softmax(-1)
        full_logp = full(input_ids=seen[ids]).logits.log_softmax(-1)
    torch.testing.assert_close(full_logp[..., seen], compact_logp[..., :-1], rtol=0, atol=1e-10)
    unseen = torch.ones(language.VOCAB_SIZE, dtype=torch.bool)
    unseen[seen] = False
    per_unseen = compact_logp[..., -1:] - offset[-1]  # the shared row's mass, split evenly
    torch.testing.assert_close(
        full_logp[..., unseen], per_unseen.expand_as(full_logp[..., unseen]), rtol=0, atol=1e-10
    )


def test_params_formula_matches_a_built_model():
    built = language._llama(RECIPE.config(), seed=0)
    assert sum(p.numel() for p in built.parameters()) == RECIPE.params()
    assert zoo.model_info(NAME).params == RECIPE.params()


def test_unigram_baseline_against_a_counting_loop():
    train = [[5, 1, 1, 2], [9, 2, 3]]
    heldout = [[0, 1, 3, 4]]
    counts = Counter(t for ids in train for t in ids[1:])
    n, vocab, alpha = sum(counts.values()), 10, 0.5
    nll = -sum(math.log((counts[t] + alpha) / (n + alpha * vocab)) for t in [1, 3, 4]) / 3
    got = language.unigram_perplexity(train, heldout, vocab_size=vocab, alpha=alpha)
    assert got == pytest.approx(math.exp(nll), rel=1e-12)


@pytest.fixture(scope="module")
def model():
    return zoo.load_model(NAME)


@pytest.fixture(scope="module")
def benign_text():
    return zoo.load_task("benign-text", max_length=language.EVAL_MAX_LENGTH)


@pytest.mark.slow
def test_it_is_a_real_language_model(model, benign_text):
    """Held-out perplexity far below the best add-α unigram model of the training split (α tuned
    on the held-out split itself, which can only favour the baseline) and the uniform guess."""
    train = [e["input_ids"] for e in benign_text.train]
    heldout = [e["input_ids"] for e in benign_text.heldout["benign-text"]]
    counts = Counter(t for ids in train for t in ids[1:])
    n = sum(counts.values())
    scored = [t for ids in heldout for t in ids[1:]]
    unigram_nll = min(
        -sum(math.log((counts[t] + a) / (n + a * language.VOCAB_SIZE)) for t in scored)
        / len(scored)
        for a in (1.0, 0.3, 0.1, 0.03, 0.01, 0.001)
    )
    measured = benign_text.evaluate(model, benign_text.eval_splits()["benign-text"])
    assert measured["loss"] < unigram_nll - 0.5  # ≥ 1.65× lower perplexity
    assert measured["loss"] < math.log(language.VOCAB_SIZE) - 4
    recorded = zoo.build_record(NAME)["metrics"]
    assert recorded["benign-text_perplexity"] == pytest.approx(measured["perplexity"], rel=1e-5)
    assert recorded["unigram_perplexity"] >= math.exp(unigram_nll)
    row = next(r for r in zoo.list_models() if r["name"] == NAME)
    assert row["prepared"] and row["kind"] == "causal-lm" and row["tokenizer"] == "smollm2-135m"


@pytest.mark.slow
def test_it_predicts_the_next_token_in_context(model, benign_text):
    """Beyond token frequencies: the loss on real text is far below the loss on the same tokens in
    shuffled order (a unigram model scores both alike)."""
    ids = torch.tensor([e["input_ids"] for e in benign_text.heldout["benign-text"][:8]])
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        real, mixed = (
            F.cross_entropy(model(input_ids=x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            for x in (ids, shuffled)
        )
    assert float(real) < float(mixed) - 1.0


@pytest.mark.slow
def test_a_harmful_fine_tuning_attack_learns(model):
    """The undefended model is a trainable subject: 40 AdamW steps at lr 3e-3 on harmful-qa cut the
    held-out harmful loss by more than 1.5 nats (perplexity ÷ 4.5; measured: 9.31 → 7.24)."""
    task = zoo.load_task("harmful-qa", max_length=96, eval_limit=16)
    spec = AttackSpec(optimizer="adamw", lr=3e-3, steps=40, batch_size=4, eval_every=40)
    result = run_attack(zoo.load_model(NAME), task, spec)
    start, end = result.evals[0]["harmful_loss"], result.evals[-1]["harmful_loss"]
    assert result.diverged_at is None
    assert end < start - 1.5, (start, end)


@pytest.mark.slow
def test_zoo_info_prints_what_the_build_recorded(capsys):
    assert main(["zoo", "info", NAME, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["params"] == shown["build"]["params"] == RECIPE.params()
    assert shown["build"]["metrics"] == zoo.build_record(NAME)["metrics"]
    assert shown["build"]["recipe"]["key"] == RECIPE.key()
    assert main(["zoo", "info", "llama-tiny-benigm"]) == 2
    assert "Did you mean" in capsys.readouterr().err
