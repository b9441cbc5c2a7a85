"""``--device`` on every command that runs a model: one shared option (specdef.commands.common),
resolved before the command runs; a device this machine lacks is a one-line error, exit 2; probe,
training and Hessian batches follow the model's device (checked here with torch's ``meta`` device,
which needs no accelerator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specdef import cli
from specdef.errors import SpecdefError
from specdef.release.sources import probe_batch
from specdef.utils.devices import check_dtype, resolve_device, to_device

# every command that runs a model (the --threads commands of tests/commands/test_threads.py)
COMPUTE = ("defend", "verify", "attack", "curvature", "detect", "transform", "run")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_every_command_that_runs_a_model_has_the_option() -> None:
    for name in COMPUTE:
        args = cli.build_parser().parse_args([name, *REQUIRED[name]])
        assert args.device == "auto", name
        args = cli.build_parser().parse_args([name, *REQUIRED[name], "--device", "cuda:1"])
        assert args.device == "cuda:1", name


REQUIRED = {
    "defend": ["m", "-o", "o", "--alpha", "10", "--top-k", "2"],
    "verify": ["a", "b"],
    "attack": ["m", "--data", "digits"],
    "curvature": ["m", "--data", "digits"],
    "detect": ["m"],
    "transform": ["m", "--adaptive", "fuse"],
    "run": ["c.yaml"],
}


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SpecdefError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(SpecdefError, match="MPS has no float64"):
        check_dtype(torch.device("mps"), torch.float64)


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_exit_2(
    device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ["defend", "mlp-digits", "-o", str(tmp_path / "o"), "--alpha", "10", "--top-k", "2"],
        ["attack", "mlp-digits", "--data", "digits", "--steps", "1"],
        ["curvature", "mlp-digits", "--data", "digits"],
    ):
        capsys.readouterr()
        assert cli.main([*argv, "--device", device]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("specdef: error: --device cuda") and "\n" not in err
        assert "CUDA is not available" in err
    assert not (tmp_path / "o").exists()


def test_device_cpu_defend_verify_attack_curvature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "d")
    cpu = ["--device", "cpu", "--threads", "1"]
    assert (
        cli.main(["defend", "mlp-digits", "-o", out, "--alpha", "100", "--top-k", "4", *cpu]) == 0
    )
    assert cli.main(["verify", "mlp-digits", out, "--json", *cpu]) == 0
    capsys.readouterr()
    argv = ["attack", out, "--data", "digits-harmful", "--optimizer", "adam", "--lr", "1e-3"]
    assert cli.main([*argv, "--steps", "3", "--batch-size", "16", "--json", *cpu]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["summary"]["steps_run"] == 3
    argv = ["curvature", out, "--data", "digits-harmful", "--batch-size", "16", "--max-hvps", "4"]
    assert cli.main([*argv, "--no-bounds", "--json", *cpu]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["eigenvalues"]


def test_batches_follow_the_model_device() -> None:
    import transformers

    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                   num_heads=4, decoder_start_token_id=0)  # fmt: skip
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(config)
    batch = probe_batch(model, None)
    assert set(batch) == {"input_ids", "attention_mask", "decoder_input_ids"}
    assert all(v.device.type == "meta" for v in batch.values())
    nested = to_device({"a": (torch.ones(1), [torch.zeros(2)]), "b": 3}, torch.device("meta"))
    assert nested["a"][0].is_meta and nested["a"][1][0].is_meta and nested["b"] == 3
