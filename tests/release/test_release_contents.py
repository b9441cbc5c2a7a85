"""What a release carries (issue 13 acceptance 2, issue 17 acceptance 3): from a source holding an
undefended ``pytorch_model.bin``, other pickles and remote code, every defend mode releases none of
them and names each one left behind; every output has a model card; an Algorithm-1 release loads
with stock ``from_pretrained`` whichever path wrote it. The pickle's payload never runs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import specdef  # noqa: F401 - registers model_type "specdef"
from _tiny import logits, tiny_llama, token_batch
from specdef.cli import main
from specdef.io.card import CARD

MARKER = "specdef-pickle-payload-ran"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:  # runs only if someone unpickles it
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def hostile_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    src = root / "src"
    tiny_llama().save_pretrained(src)
    marker = root / MARKER
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (src / name).write_bytes(pickle.dumps(_Payload(marker)))
    (src / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    (src / "LICENSE").write_text("Apache-2.0\n")
    return src


@pytest.mark.parametrize("mode", ["algorithm1", "native"])
@pytest.mark.parametrize("streaming", [False, True])
def test_release_is_an_allowlist_with_a_card(
    hostile_source: Path,
    tmp_path: Path,
    mode: str,
    streaming: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    args = ["defend", str(hostile_source), "-o", str(out), "--alpha", "100", "--top-k", "2"]
    args += ["--mode", mode] + (["--streaming"] if streaming else [])
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert not names & {
        "pytorch_model.bin",
        "training_args.bin",
        "optimizer.pt",
        "modeling_evil.py",
    }
    assert not any(n.endswith((".bin", ".pt", ".py")) for n in names)
    for left in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        assert f"not copied: {left} — pickle" in printed
    assert "not copied: modeling_evil.py — code" in printed
    if streaming:
        assert "LICENSE" in names  # licence text is on the allowlist
    assert not (hostile_source.parent / MARKER).exists()

    text = (out / CARD).read_text()
    assert (
        f"specdef-{mode}" in text and "| α | 100 |" in text and "informed attacker undoes" in text
    )

    if mode == "algorithm1":
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "specdef"
        loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        reference = tiny_llama()
        gap = (logits(loaded, token_batch()) - logits(reference, token_batch())).abs().max()
        assert float(gap / logits(reference, token_batch()).abs().max()) < 5e-2
    else:  # a native release is a stock checkpoint
        loaded = AutoModelForCausalLM.from_pretrained(str(out))
        assert type(loaded).__name__ == "LlamaForCausalLM"


def test_json_names_what_was_not_copied(
    hostile_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [
        "defend",
        str(hostile_source),
        "-o",
        str(out),
        "--alpha",
        "100",
        "--top-k",
        "2",
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    left = {row["file"]: row["reason"] for row in result["not_copied"]}
    assert left["pytorch_model.bin"].startswith("pickle") and left["modeling_evil.py"].startswith(
        "code"
    )
    header = json.loads(
        (out / "model.safetensors").read_bytes()[
            8 : 8 + int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
        ]
    )
    described = json.loads(header["__metadata__"]["specdef"])
    assert described["alpha"] == [100.0] and described["layers"] == len(result["layers"])
    assert torch.isfinite(torch.tensor(result["model_output_gap"]))
