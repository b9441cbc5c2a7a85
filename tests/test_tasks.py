"""specdef.tasks: the task containers' user errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny import tiny_llama
from specdef.errors import SpecdefError
from specdef.tasks import CausalLMTask, ClassificationTask, check_compatible


def test_empty_training_set_is_a_user_error_not_an_endless_loop() -> None:
    empty = ClassificationTask("e", (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), {})
    with pytest.raises(SpecdefError, match="no training examples"):
        next(empty.train_batches(batch_size=4, seed=0))
    lm = CausalLMTask("lm", [], {}, pad_id=0)
    with pytest.raises(SpecdefError, match="no training examples"):
        next(lm.train_batches(batch_size=4, seed=0))


def test_check_compatible_refuses_mismatches_before_training() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    features = ClassificationTask("f", (x, y), {"heldout": (x, y)})
    mlp = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    mlp.train()
    stats = mlp[1].running_mean.clone()
    check_compatible(mlp, features)  # fits: accepted
    assert mlp.training and torch.equal(mlp[1].running_mean, stats)  # the probe left no trace
    narrow = ClassificationTask("narrow", (x[:, :4], y), {"heldout": (x[:, :4], y)})
    with pytest.raises(SpecdefError, match="cannot run on task 'narrow'"):
        check_compatible(mlp, narrow)

    def example(ids: list[int]) -> dict[str, list[int]]:
        return {"input_ids": ids, "labels": ids}

    tokens = CausalLMTask("t", [example([3, 4, 5])], {"heldout": [example([6, 7])]}, pad_id=0)
    with pytest.raises(SpecdefError, match="takes feature tensors but task 't' gives token ids"):
        check_compatible(mlp, tokens)
    llama = tiny_llama()  # 96 embedding rows
    check_compatible(llama, tokens)
    with pytest.raises(SpecdefError, match="is a language model"):
        check_compatible(llama, features)
    big = CausalLMTask("big", [example([3, 4])], {"heldout": [example([500, 7])]}, pad_id=0)
    with pytest.raises(SpecdefError, match="token id 500 but the vocabulary of the model has 96"):
        check_compatible(llama, big)
