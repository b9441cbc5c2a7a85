"""The holdout matrix (issue 17): every architecture family in tests/_archs.py × {algorithm1,
native}, through the release pipeline a user runs. Each cell defends a saved float64 model
(``release.defend.defend``, probe batch from the config), verifies it against the source, reloads
it with stock ``from_pretrained`` (specdef imported, so model_type "specdef" is registered) and
compares float64 logits with the undefended model's, and detects the defense from the saved tensors
alone (the manifest and the native record deleted first). A cell either passes or is one of the
refusals listed in REFUSED, a one-line SpecdefError naming why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import specdef  # noqa: F401 - registers model_type "specdef" with transformers' Auto classes
from _archs import ARCHS, output
from specdef.cli import main
from specdef.defense.config import SpecDefConfig
from specdef.defense.guard import default_tolerance
from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError
from specdef.informed.detect import detect_checkpoint
from specdef.io.checkpoint import ARCHITECTURE_KEY, MANIFEST, NATIVE_RECORD, WEIGHTS, load_defended
from specdef.release.defend import DefendRequest, defend
from specdef.release.sources import load_source
from specdef.release.verify import verify

MODES = ("algorithm1", "native")
CONFIG = SpecDefConfig(alpha=1e3, top_k=2, targets="all-linear")
# (arch, mode) → what the one-line refusal must say; every other cell must pass
REFUSED: dict[tuple[str, str], str] = {}


def _float64(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _source(tmp_path: Path, arch: str) -> Path:
    src = tmp_path / "src"
    ARCHS[arch].build().double().save_pretrained(str(src))
    return src


def _strip_records(path: Path) -> None:
    for name in (MANIFEST, NATIVE_RECORD):
        (path / name).unlink(missing_ok=True)


def _check_detected(path: Path, mode: str, defended: set[str], pairs: int) -> None:
    _strip_records(path)
    found = detect_checkpoint(path)
    if mode == "algorithm1":
        assert {p.inflated.removesuffix(".inflated") for p in found.pairs} == defended
        return
    assert found.native is not None and len(found.native) == pairs
    assert len(found.native_deformed) == pairs  # every pair defended (all-linear), none missed
    assert not found.pairs  # and no Algorithm-1 pair invented


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_matrix_cell(tmp_path: Path, arch: str, mode: str) -> None:
    entry = ARCHS[arch]
    src = _source(tmp_path, arch)
    auto = getattr(transformers, entry.auto)
    batch = _float64(entry.batch())
    # the oracle goes through the same stock loader (some families, e.g. Gemma, compute buffers at
    # load time that differ from a .double() cast by ~1e-7): only the defense differs between them
    reference = output(auto.from_pretrained(str(src)).eval(), batch)
    out = tmp_path / "out"
    request = DefendRequest(source=str(src), output=out, config=CONFIG, mode=mode)
    if (arch, mode) in REFUSED:
        with pytest.raises(SpecdefError, match=REFUSED[arch, mode]) as err:
            defend(request)
        assert "\n" not in str(err.value)
        return
    result = defend(request)

    checked = verify(load_source(str(src)), load_source(str(out)))
    assert checked.passed, checked.max_rel_diff
    assert checked.dtype == "float64"

    loaded = auto.from_pretrained(str(out)).eval()
    gap = float((output(loaded, batch) - reference).abs().max() / reference.abs().max())
    assert gap <= default_tolerance(torch.float64), gap
    defended = set(defended_layers(loaded))
    if mode == "algorithm1":
        assert result.report is not None
        assert defended == {layer.name for layer in result.report.layers}
    else:  # native: the stock class, nothing added
        assert not defended and type(loaded).__name__ == type(entry.build()).__name__
        assert json.loads((out / NATIVE_RECORD).read_text())["mode"] == "native"
    assert "Defended with specdef" in (out / "README.md").read_text()
    _check_detected(out, mode, defended, len(result.pairs))


def test_conv2d_cnn_cells(tmp_path: Path) -> None:
    """The zoo's Conv2d CNN (a specdef architecture, so it reloads with load_defended, not
    transformers). Algorithm 1 defends its linear layers; a convolution named as an Algorithm-1
    target is refused in one line naming Conv2d. Native mode deforms the Conv2d → ReLU → MaxPool
    → Conv2d pair (output channels of the first, input channels of the second) and detection finds
    it with the manifest deleted, like every other cell: the architecture comes from the weight
    file's header (``{name, kwargs}``, what config.json is to a transformers model). With that
    header entry gone too, native deformation is reported as not checked, never guessed."""
    out = tmp_path / "a1"
    result = defend(DefendRequest(source="cnn-digits", output=out, config=CONFIG))
    assert result.report is not None
    names = {layer.name for layer in result.report.layers}
    assert names == {"fc1", "head"}
    original = load_source("cnn-digits")
    checked = verify(original, load_source(str(out)))
    assert checked.passed
    assert set(defended_layers(load_defended(out))) == names
    (out / MANIFEST).unlink()
    assert {p.inflated.removesuffix(".inflated") for p in detect_checkpoint(out).pairs} == names

    conv = SpecDefConfig(alpha=1e3, top_k=2, targets=("features.0",))
    with pytest.raises(SpecdefError, match="Conv2d") as err:
        defend(DefendRequest(source="cnn-digits", output=tmp_path / "conv", config=conv))
    assert "\n" not in str(err.value)

    native = tmp_path / "native"
    result = defend(DefendRequest(source="cnn-digits", output=native, config=CONFIG, mode="native"))
    assert [p.pair for p in result.pairs] == ["features.0+features.3"]
    assert verify(original, load_source(str(native))).passed
    _strip_records(native)
    found = detect_checkpoint(native)
    assert [p.inflated for p in found.native_deformed] == ["features.0"] and not found.pairs
    assert found.native is not None and len(found.native) == len(result.pairs)

    _drop_architecture_header(native / WEIGHTS)
    assert detect_checkpoint(native).native is None


def _drop_architecture_header(file: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - not a dict
    assert meta.pop(ARCHITECTURE_KEY)
    save_file(tensors, str(file), metadata=meta)


@pytest.mark.parametrize(
    ("arch", "mode"), [("llama", "native"), ("t5", "algorithm1"), ("whisper", "native"),
                       ("vit", "algorithm1"), ("phi3", "native")],
)  # fmt: skip
def test_matrix_cells_through_the_cli(
    tmp_path: Path, arch: str, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A representative subset through the CLI in-process: defend → verify → detect."""
    src, out = _source(tmp_path, arch), tmp_path / "out"
    common = ["--threads", "1"]
    assert main(["defend", str(src), "-o", str(out), "--alpha", "1000", "--top-k", "2",
                 "--mode", mode, *common]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["verify", str(src), str(out), "--json", *common]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert verified["passed"] and verified["dtype"] == "float64"
    assert verified["max_rel_diff"] <= default_tolerance(torch.float64)
    _strip_records(out)
    assert main(["detect", str(out), "--json", *common]) == 0
    found = json.loads(capsys.readouterr().out)
    if mode == "algorithm1":
        assert found["pairs"]
    else:
        assert not found["pairs"]
        assert found["native"] and all(p["deformed"] for p in found["native"])
