"""specdef.tasks: the task containers' user errors."""

from __future__ import annotations

import pytest
import torch

from specdef.errors import SpecdefError
from specdef.tasks import CausalLMTask, ClassificationTask


def test_empty_training_set_is_a_user_error_not_an_endless_loop() -> None:
    empty = ClassificationTask("e", (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), {})
    with pytest.raises(SpecdefError, match="no training examples"):
        next(empty.train_batches(batch_size=4, seed=0))
    lm = CausalLMTask("lm", [], {}, pad_id=0)
    with pytest.raises(SpecdefError, match="no training examples"):
        next(lm.train_batches(batch_size=4, seed=0))
