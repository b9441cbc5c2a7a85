"""Data-parallel attacks: two CPU processes (torchrun, gloo, through accelerate) train exactly as one
process with the same global batch — each process takes its slice of one global batch stream and
DDP averages the two equal-size slices' gradients, which is the global mean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _attack_helpers import digits_task, pretrained_mlp
from specdef.attack.loop import AttackSpec, run_attack

SPEC = {"optimizer": "sgd", "lr": 0.05, "steps": 12, "batch_size": 16, "seed": 3, "eval_every": 6}

SCRIPT = f"""
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from accelerate import Accelerator
from safetensors.torch import save_file
from _attack_helpers import digits_task, pretrained_mlp
from specdef.attack.loop import AttackSpec, run_attack

accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == 2, accelerator.num_processes
model = pretrained_mlp()
spec = AttackSpec(**{SPEC!r})
result = run_attack(model, digits_task(range(5, 10)), spec, accelerator=accelerator)
if accelerator.is_main_process:
    state = accelerator.unwrap_model(model).state_dict()
    loss = torch.tensor([h["train_loss"] for h in result.history])
    save_file({{**{{k: v.contiguous() for k, v in state.items()}}, "loss": loss}}, sys.argv[1])
"""


@pytest.mark.slow
def test_two_processes_equal_one_with_the_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "attack_ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    two = load_file(str(out))

    model = pretrained_mlp()
    single = AttackSpec(**{**SPEC, "batch_size": 2 * SPEC["batch_size"]})
    result = run_attack(model, digits_task(range(5, 10)), single)
    # rank 0's training loss is its slice's; the parameters are the global run's
    for name, tensor in model.state_dict().items():
        assert torch.allclose(two[name], tensor, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(two["layers.0.weight"], pretrained_mlp().state_dict()["layers.0.weight"])
    assert len(two["loss"]) == len(result.history) == SPEC["steps"]
