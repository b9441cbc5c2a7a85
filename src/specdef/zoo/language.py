"""Small language models pretrained on the zoo's benign text by a fixed recipe: real (trained) subjects
for attack searches that run in seconds a step on a CPU, beside SmolLM2 for the headline.

A recipe trains a Llama with SmolLM2's tokenizer and vocabulary (49,152 tokens, tied embeddings) on the
``benign-text`` train split. The corpus uses only a few thousand of those tokens, so training runs on a
*compact* copy whose vocabulary is the tokens seen in training plus one row shared by every unseen
token; the unseen row's logit gets ``+log(number of unseen tokens)``. That is exact, not an
approximation: once the shared row is copied into every unseen token's row of the full embedding,
the full model's softmax over 49,152 tokens equals the compact model's softmax, so the compact loss is
the full model's loss (``tests/zoo/test_language.py`` checks this), at a tenth of the cost of the
output layer. The cache manifest records the measured held-out perplexity, the unigram and uniform
baselines of the same split, and the training time.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from specdef.errors import SpecdefError, did_you_mean
from specdef.tasks import CausalLMTask
from specdef.utils.provenance import provenance
from specdef.zoo import hf
from specdef.zoo._cache import ensure_entry, entry_dir, fingerprint, read_manifest
from specdef.zoo.datasets import load_task

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

log = logging.getLogger(__name__)

CacheDir = str | os.PathLike[str] | None
_RECIPE_VERSION = 1  # bump when the training loop below changes
VOCAB_SIZE = int(hf._LM_IDS["vocab_size"])
EVAL_MAX_LENGTH = 256  # the zoo's default chunking: the held-out split every zoo LM is scored on
UNIGRAM_SMOOTHING = (
    0.1  # add-α pseudo-count of the unigram baseline (α=0.1 scores best of 1, 0.1, 0.01)
)


@dataclass(frozen=True)
class LanguageRecipe:
    """How a zoo language model is trained: a Llama's sizes, the data and AdamW's schedule."""

    hidden: int = 64  # hidden size (embedding width)
    intermediate: int = 256  # MLP width
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention, like SmolLM2
    task: str = "benign-text"  # a zoo causal-lm task: its train split at EVAL_MAX_LENGTH tokens
    window: int = 128  # training sequence length: each 256-token chunk is cut into windows
    steps: int = 400  # optimiser steps
    batch_size: int = 16  # windows per step
    lr: float = 1e-2  # AdamW peak learning rate: linear warm-up, then cosine decay to zero
    warmup: int = 30
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    seed: int = 0  # initial weights and window order
    description: str = field(default="", compare=False)

    def key(self) -> str:
        spec = asdict(self)
        spec.pop("description")
        return fingerprint({**spec, "version": _RECIPE_VERSION})

    def config(self, vocab_size: int = VOCAB_SIZE) -> dict[str, Any]:
        """``LlamaConfig`` keyword arguments (SmolLM2's special ids; ``vocab_size`` for the compact copy)."""
        return {
            **hf._LM_IDS,
            "vocab_size": vocab_size,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        }

    def params(self) -> int:
        """Parameters of the full model (tied embedding counted once), from the sizes alone:
        building it would import transformers' Llama at import time."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return VOCAB_SIZE * self.hidden + self.layers * layer + self.hidden


RECIPES: dict[str, LanguageRecipe] = {
    "llama-tiny-benign": LanguageRecipe(
        description="Llama, 2 layers, hidden 64, 4 heads / 2 KV heads, MLP 256, tied embeddings, "
        "SmolLM2's vocabulary; trained 400 AdamW steps on benign-text",
    ),
}


def _recipe(name: str) -> LanguageRecipe:
    if name not in RECIPES:
        raise SpecdefError(did_you_mean(name, RECIPES, what="language model"))
    return RECIPES[name]


def _llama(config: dict[str, Any], seed: int) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy optional dependency

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**config))


def unigram_perplexity(
    train: Sequence[Sequence[int]],
    heldout: Sequence[Sequence[int]],
    *,
    vocab_size: int = VOCAB_SIZE,
    alpha: float = UNIGRAM_SMOOTHING,
) -> float:
    """Perplexity on ``heldout`` of add-``alpha`` unigram counts from ``train`` over ``vocab_size``
    tokens, scoring the positions a causal LM scores (every token but each sequence's first)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in train:
        counts += torch.bincount(torch.tensor(ids[1:]), minlength=vocab_size).double()
    logp = ((counts + alpha) / (counts.sum() + alpha * vocab_size)).log()
    scored = torch.tensor([t for ids in heldout for t in ids[1:]])
    return float((-logp[scored].mean()).exp())


def expand_embedding(compact: torch.Tensor, seen: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``(vocab_size, hidden)``: row ``seen[i]`` is ``compact[i]``; every other row is the shared
    unseen row ``compact[-1]``."""
    full = compact[-1].expand(vocab_size, compact.shape[1]).clone()
    full[seen] = compact[:-1]
    return full


def _windows(task_train: Sequence[dict[str, list[int]]], window: int) -> torch.Tensor:
    chunks = torch.tensor([e["input_ids"] for e in task_train])  # (n, 256): full chunks only
    length = chunks.shape[1]
    return chunks[:, : length - length % window].reshape(-1, window)


def _train(recipe: LanguageRecipe, cache_dir: CacheDir) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    tokenizer = hf.smollm2_tokenizer(cache_dir)
    task = load_task(recipe.task, tokenizer=tokenizer, max_length=EVAL_MAX_LENGTH, seed=0)
    if not isinstance(task, CausalLMTask):
        raise SpecdefError(f"A language recipe needs a causal-lm task, found {recipe.task!r}.")
    windows = _windows(task.train, recipe.window)
    seen = torch.unique(windows)  # sorted: the compact model's rows, then the shared unseen row
    n_unseen = VOCAB_SIZE - len(seen)
    to_compact = torch.full((VOCAB_SIZE,), len(seen), dtype=torch.long)
    to_compact[seen] = torch.arange(len(seen))
    data = to_compact[windows]
    # Every unseen token shares the last row: its logit stands for n_unseen identical logits.
    offset = torch.zeros(len(seen) + 1)
    offset[-1] = math.log(n_unseen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible reductions, and the cost the docs quote
    try:
        compact = _llama(recipe.config(len(seen) + 1), recipe.seed)
        opt = torch.optim.AdamW(
            compact.parameters(),
            lr=recipe.lr,
            betas=recipe.betas,
            weight_decay=recipe.weight_decay,
        )

        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / recipe.warmup)
            return warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        gen = torch.Generator().manual_seed(recipe.seed)
        order = torch.empty(0, dtype=torch.long)
        compact.train()
        start, start_cpu = time.perf_counter(), time.process_time()
        losses = []
        for _ in range(recipe.steps):
            if len(order) < recipe.batch_size:  # a new epoch: reshuffle the windows
                order = torch.randperm(len(data), generator=gen)
            batch, order = data[order[: recipe.batch_size]], order[recipe.batch_size :]
            # The head on the first n-1 positions only: slicing full logits costs a copy and a
            # zero-filled gradient of the whole (batch, window, vocabulary) tensor.
            hidden = compact.model(input_ids=batch).last_hidden_state[:, :-1]
            logits = compact.lm_head(hidden) + offset
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        model = expand(compact, seen, recipe)
        heldout = task.heldout[recipe.task]
        scored = task.evaluate(model, task.eval_splits()[recipe.task])
    finally:
        torch.set_num_threads(threads)
    train_ids = [e["input_ids"] for e in task.train]
    heldout_ids = [e["input_ids"] for e in heldout]
    metrics = {
        f"{recipe.task}_loss": scored["loss"],
        f"{recipe.task}_perplexity": scored["perplexity"],
        "unigram_perplexity": unigram_perplexity(train_ids, heldout_ids),
        "uniform_perplexity": float(VOCAB_SIZE),
        "heldout_examples": len(heldout),
        "heldout_tokens": sum(len(ids) - 1 for ids in heldout_ids),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
    }
    training = {
        "seconds": seconds,  # wall time of the training loop: depends on the machine's load
        "cpu_seconds": cpu_seconds,  # this process's CPU time for the same loop
        "threads": 1,
        "steps": recipe.steps,
        "tokens": recipe.steps * recipe.batch_size * recipe.window,
        "train_windows": len(data),
        "vocabulary_seen": len(seen),
    }
    return model, {"metrics": metrics, "training": training}


def expand(
    compact: LlamaForCausalLM, seen: torch.Tensor, recipe: LanguageRecipe
) -> LlamaForCausalLM:
    """The full-vocabulary Llama equal to ``compact`` (vocabulary ``seen`` + one shared unseen row)."""
    state = dict(compact.state_dict())
    embedding = expand_embedding(state.pop("model.embed_tokens.weight"), seen, VOCAB_SIZE)
    state.pop("lm_head.weight", None)
    model = _llama(recipe.config(), recipe.seed)
    model.model.embed_tokens.weight.data.copy_(embedding)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"model.embed_tokens.weight", "lm_head.weight"}:
        raise RuntimeError(
            f"expanding the compact model: missing {missing}, unexpected {unexpected}"
        )
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("the expanded model's lm_head lost its tie to embed_tokens")
    return model.eval()


def _cache_key(name: str) -> str:
    return f"{name}-{_recipe(name).key()}"


def prepare_language_model(name: str, *, cache_dir: CacheDir = None, verify: bool = False) -> Path:
    """Train model ``name`` by its recipe into the cache (once) and return its Hugging Face folder."""
    recipe = _recipe(name)
    hf._hub_offline()

    def build(tmp: Path) -> dict[str, Any]:
        log.info("training %s by recipe %s (about a minute on one thread)", name, recipe.key())
        model, measured = _train(recipe, cache_dir)
        model.save_pretrained(tmp)
        return {
            "recipe": {**asdict(recipe), "key": recipe.key()},
            **measured,
            "params": sum(p.numel() for p in model.parameters()),
            "provenance": provenance(),
        }

    path, _ = ensure_entry("models", _cache_key(name), build, cache_dir=cache_dir, verify=verify)
    return path


def language_prepared(name: str, *, cache_dir: CacheDir = None) -> bool:
    return read_manifest(entry_dir("models", _cache_key(name), cache_dir=cache_dir)) is not None


def load_language_model(
    name: str, *, dtype: torch.dtype, attn_implementation: str | None, cache_dir: CacheDir = None
) -> nn.Module:
    from transformers import AutoModelForCausalLM  # heavy optional dependency

    path = prepare_language_model(name, cache_dir=cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval()
