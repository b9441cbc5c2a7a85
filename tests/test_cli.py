"""The CLI on hostile input (issue 13, acceptance 1): every case of the review's "Why" list is a
one-line error with exit 2 and nothing written — or, where the input is fine, rightly accepted —
and never a traceback. The hostile fixtures are built here: remote-code configs whose code would
write a marker file, NaN/Inf and transposed tensors, manifests re-bound by a hostile writer,
garbage results rows, and full disks through a patched write. Cases held elsewhere are named in
docs/security.md (release allowlist, traversal indexes, the bound manifest, alias bombs, -o vs SRC,
grid validation)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from _tiny import tiny_llama
from specdef.cli import main
from specdef.defense.config import SpecDefConfig
from specdef.errors import SpecdefError
from specdef.io.checkpoint import MANIFEST
from specdef.utils.files import file_sha256

MARKER = "specdef-remote-code-ran"
Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"


def refused(capsys: pytest.CaptureFixture[str], argv: list[Any], match: str) -> str:
    """Run the CLI in-process; assert exit 2, one line on stderr containing ``match``."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert match in err[0], err[0]
    return err[0]


def accepted(capsys: pytest.CaptureFixture[str], argv: list[Any]) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    return out


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("llama") / "src"
    tiny_llama().save_pretrained(src)
    return src


def _variant(llama: Path, tmp_path: Path, name: str, edit: Callable[[Path], None]) -> Path:
    out = tmp_path / name
    shutil.copytree(llama, out)
    edit(out)
    return out


def _edit_tensor(
    value: float | None = None, transpose: str | None = None
) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        tensors = load_file(str(root / "model.safetensors"))
        if value is not None:
            tensors[Q][0, 0] = value
        if transpose is not None:
            tensors[transpose] = tensors[transpose].t().contiguous()
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})

    return edit


def _auto_map(model_type: str | None = None) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        config = json.loads((root / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
        if model_type is not None:
            config["model_type"] = model_type
            config["auto_map"]["AutoConfig"] = "modeling_evil.EvilConfig"
        (root / "config.json").write_text(json.dumps(config))
        marker = root.parent / MARKER
        (root / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    return edit


# ----------------------------------------------------------------- remote code (auto_map)


def test_auto_map_is_ignored_never_run_and_never_released(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A known model type with an ``auto_map``: rightly accepted (transformers' own class is used,
    trust_remote_code=False), the entry is removed from every release and named in the report,
    and the remote code never runs."""
    src = _variant(llama, tmp_path, "automap", _auto_map())
    for i, extra in enumerate(([], ["--streaming"], ["--mode", "native"])):
        out = tmp_path / f"out{i}"
        printed = accepted(capsys, ["defend", src, "-o", out, "--alpha", 10, "--top-k", 1, *extra])
        assert "not copied: config.json: auto_map — remote-code reference" in printed
        assert "auto_map" not in json.loads((out / "config.json").read_text())
        assert not (out / "modeling_evil.py").exists()
    accepted(capsys, ["verify", src, tmp_path / "out0"])
    accepted(capsys, ["transform", src, "--adaptive", "fuse"])
    accepted(capsys, ["detect", src])
    # attack and curvature load it past the config too, then meet the next check: this tiny
    # model has no tokenizer of its own, and the default one's ids overflow its 96-row vocabulary
    refused(capsys, ["curvature", src, "--data", "benign-qa"], "vocabulary of model")
    refused(capsys, ["attack", src, "--data", "benign-qa", "--steps", 1], "vocabulary of model")
    assert not (tmp_path / MARKER).exists()


def test_auto_map_of_a_type_only_remote_code_defines_is_one_line(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _variant(llama, tmp_path, "evil", _auto_map(model_type="evilmodel"))
    before = listing(tmp_path)
    for argv in (
        ["defend", src, "-o", tmp_path / "o1", "--alpha", 10, "--top-k", 1],
        ["defend", src, "-o", tmp_path / "o2", "--alpha", 10, "--top-k", 1, "--streaming"],
        ["transform", src, "--adaptive", "fuse"],
        ["attack", src, "--data", "benign-text", "--steps", 1],
        ["curvature", src, "--data", "benign-text"],
    ):
        refused(capsys, argv, "asks for remote code via auto_map")
    assert listing(tmp_path) == before
    assert not (tmp_path / MARKER).exists()


def test_auto_map_in_tokenizer_config_is_stripped_from_the_release(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from specdef import zoo

    def edit(root: Path) -> None:
        zoo.load_tokenizer("llama-tiny-benign").save_pretrained(root)
        path = root / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        path.write_text(json.dumps(config))

    src = _variant(llama, tmp_path, "tok", edit)
    for i, extra in enumerate(([], ["--streaming"])):
        out = tmp_path / f"out{i}"
        printed = accepted(capsys, ["defend", src, "-o", out, "--alpha", 10, "--top-k", 1, *extra])
        assert "not copied: tokenizer_config.json: auto_map" in printed
        assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())


# ----------------------------------------------------------------- bad options


@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_exclude_regex_is_one_line_and_leaves_no_partial(
    llama: Path, tmp_path: Path, streaming: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["defend", llama, "-o", out, "--alpha", 10, "--top-k", 1, "--exclude", "re:(x"]
    refused(capsys, argv + (["--streaming"] if streaming else []), "Invalid exclude regex '(x'")
    assert listing(tmp_path) == set()  # no OUT, no .out.partial


def test_attack_out_naming_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results"
    target.write_text("mine\n")
    argv = ["attack", "mlp-digits", "--data", "digits", "--steps", 1, "--out", target]
    refused(capsys, argv, "is a file; --out names a run directory")
    assert target.read_text() == "mine\n"


@pytest.fixture(scope="module")
def defended_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlp") / "defended"
    assert main(["defend", "mlp-digits", "-o", str(out), "--alpha", "10", "--top-k", "1"]) == 0
    return out


@pytest.mark.parametrize("tolerance", ["-1", "0", "nan", "inf"])
def test_verify_tolerance_must_be_positive_and_finite(
    defended_mlp: Path, tolerance: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["verify", "mlp-digits", defended_mlp, "--tolerance", tolerance]
    refused(capsys, argv, "Expected --tolerance > 0 (finite)")


def test_unknown_defense_keys_and_types_are_refused_with_did_you_mean() -> None:
    with pytest.raises(SpecdefError, match=r"Unknown defense key 'topk'\. Did you mean: top_k"):
        SpecDefConfig.from_dict({"alpha": 10, "top_k": 1, "topk": 3})
    with pytest.raises(SpecdefError, match="seed must be an integer"):
        SpecDefConfig.from_dict({"alpha": 10, "top_k": 1, "seed": 0.5})
    with pytest.raises(SpecdefError, match="targets must be"):
        SpecDefConfig.from_dict({"alpha": 10, "top_k": 1, "targets": 5})
    # the experiment's own key is read by its runner, not by SpecDefConfig
    assert SpecDefConfig.from_dict({"alpha": 10, "top_k": 1, "mode": "native"}, also=("mode",))


YAML = """name: hostile
kind: attack
model: mlp-digits
task: digits
attack: {optimizer: adam, lr: 1.0e-3, steps: 2, eval_every: 1, batch_size: 8}
"""


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t + "seeds: [a, b]\n", "seeds must be integers, found 'a'"),
        (lambda t: t + "seeds: [0.5, 1.7]\n", "seeds must be integers, found 0.5"),
        (lambda t: t.replace("steps: 2", "steps: forty"), "attack has a value of the wrong type"),
        (lambda t: t.replace("steps: 2", "stepz: 2"), "Unknown attack key 'stepz'"),
        (lambda t: t + "defense: {alpha: 10, top_k: 1, topk: 2}\n", "Did you mean: top_k"),
        (lambda t: t.replace("mlp-digits", "tiny-llama"), "cannot train on task 'digits'"),
    ],
    ids=["seeds-text", "seeds-float", "steps-forty", "unknown-attack-key", "unknown-defense-key",
         "model-task-kind"],
)  # fmt: skip
@pytest.mark.parametrize("dry_run", [True, False])
def test_run_config_errors_before_anything_is_written(
    tmp_path: Path,
    edit: Callable[[str], str],
    match: str,
    dry_run: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(edit(YAML))
    out = tmp_path / "run"
    refused(capsys, ["run", config, "--out", out, *(["--dry-run"] if dry_run else [])], match)
    assert not out.exists()


# ----------------------------------------------------------------- hostile tensors


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_detect_transform_and_defend(
    llama: Path, tmp_path: Path, value: float, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _variant(llama, tmp_path, "bad", _edit_tensor(value=value))
    refused(capsys, ["detect", src], f"Tensor {Q!r}")
    refused(capsys, ["transform", src, "--adaptive", "fuse"], "contains NaN or Inf")
    refused(capsys, ["defend", src, "-o", tmp_path / "o", "--alpha", 10, "--top-k", 1], "NaN")
    refused(capsys, ["attack", src, "--data", "benign-text", "--steps", 1], "NaN or Inf")
    assert not (tmp_path / "o").exists()


def test_transposed_header_is_refused_before_anything_is_written(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _variant(llama, tmp_path, "transposed", _edit_tensor(transpose=K))
    for extra in ([], ["--streaming"]):
        argv = ["defend", src, "-o", tmp_path / "o", "--alpha", 10, "--top-k", 1, *extra]
        refused(capsys, argv, f"Tensor {K!r} has shape [48, 24] in the header")
        assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()
    # detect reads only the numbers (any 2-D matrix is a matrix): rightly accepted
    accepted(capsys, ["detect", src])


# ----------------------------------------------------------------- model / task mismatches


def test_model_task_mismatches_are_refused_before_training(
    llama: Path, defended_mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    refused(
        capsys,
        ["attack", "mlp-digits", "--data", "harmful-qa", "--steps", 1, "--out", out],
        "Model 'mlp-digits' (vision) cannot train on task 'harmful-qa' (causal-lm)",
    )
    refused(capsys, ["curvature", "mlp-digits", "--data", "benign-qa"], "cannot train on task")
    refused(capsys, ["attack", defended_mlp, "--data", "benign-qa"], "takes feature tensors")
    refused(capsys, ["attack", llama, "--data", "digits", "--steps", 1], "is a language model")
    refused(capsys, ["verify", llama, defended_mlp], "is OUT a defended copy of SRC?")
    assert not out.exists()


def test_vocabulary_smaller_than_the_tokenizer_ids_is_refused(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny Llama has 96 embedding rows; the benign model's tokenizer, saved beside it, emits
    ids far above that (an IndexError deep in the embedding before)."""
    from specdef import zoo

    src = _variant(
        llama, tmp_path, "tok", lambda r: zoo.load_tokenizer("llama-tiny-benign").save_pretrained(r)
    )
    for argv in (
        ["curvature", src, "--data", "benign-qa"],
        ["attack", src, "--data", "benign-qa", "--steps", 1, "--out", tmp_path / "run"],
    ):
        refused(capsys, argv, "vocabulary of model")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- manifests a hostile writer bound


def _rebind(manifest: dict[str, Any], root: Path) -> None:
    """What a hostile writer can do: edit the manifest, then recompute its integrity record (the
    digests are no secret)."""
    manifest.pop("integrity", None)
    files = {f: file_sha256(root / f) for f in ("model.safetensors",)}
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    manifest["integrity"] = {"files": files, "manifest": hashlib.sha256(body.encode()).hexdigest()}
    (root / MANIFEST).write_text(json.dumps(manifest))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        *head, last = path.split(".")
        target: Any = manifest
        for key in head:
            target = target[int(key)] if key.isdigit() else target[key]
        if value is _DROP:
            del target[last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return edit


_DROP = object()
MANIFEST_CASES = {
    "missing-shape": (_set("structure.0.shape", _DROP), "structure[0].shape must be"),
    "shape-text": (_set("structure.0.shape", "x"), "structure[0].shape must be"),
    "huge-shape": (_set("structure.0.shape", [10**6, 10**6]), "Manifest shape 1000000×1000000"),
    "huge-hidden": (_set("model.architecture.kwargs.hidden", [10**6, 10**6]), "does not match"),
    "structure-5": (_set("structure", 5), "'structure' must be a list"),
    "alpha-text": (_set("structure.0.alpha", "big"), "alpha must be a finite number > 1"),
    "top-k-1e6": (_set("structure.0.top_k", 10**6), "top_k must be a whole number in [1, 64]"),
    "weights-text": (_set("weights", "x"), "'weights.files' must be a list"),
    "model-5": (_set("model", 5), "'model' must be an object"),
    "missing-architecture": (_set("model.architecture", _DROP), "'model.architecture' must be"),
    "weights-outside": (_set("weights.files", ["/etc/passwd"]), "absolute or '..' path"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_a_rebound_hostile_manifest_is_refused_before_any_allocation(
    defended_mlp: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, match = MANIFEST_CASES[case]
    root = tmp_path / "ckpt"
    shutil.copytree(defended_mlp, root)
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    _rebind(manifest, root)
    refused(capsys, ["verify", "mlp-digits", root], match)
    refused(capsys, ["attack", root, "--data", "digits", "--steps", 1], match)
    if case not in ("huge-shape", "huge-hidden"):  # inspect shows only what the schema allows
        refused(capsys, ["inspect", root], match)


def test_inspect_refuses_an_edited_manifest(
    defended_mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Edited without re-binding (a layer dropped, top_k raised): inspect no longer displays it."""
    for key, value in (("structure", []), ("format_version", 2.5)):
        root = tmp_path / key
        shutil.copytree(defended_mlp, root)
        manifest = json.loads((root / MANIFEST).read_text())
        manifest[key] = value
        (root / MANIFEST).write_text(json.dumps(manifest))
        refused(capsys, ["inspect", root], "was changed after it was written")


def test_invalid_json_in_a_shard_index_is_one_line(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _variant(
        llama, tmp_path, "ix", lambda r: (r / "model.safetensors.index.json").write_text("{x")
    )
    argv = ["defend", src, "-o", tmp_path / "o", "--alpha", 10, "--top-k", 1, "--streaming"]
    refused(capsys, argv, "is not valid JSON")
    argv = ["detect", src]
    refused(capsys, argv, "is not valid JSON")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------- results files


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"run_id": "a"}\nnot json\n{"run_id": "b"}\n', "Line 2 of"),
        ('[1, 2]\n', "Line 1 of"),
    ],
    ids=["garbage-line", "not-an-object"],
)  # fmt: skip
def test_report_on_garbage_rows_is_one_line(
    tmp_path: Path, text: str, match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "results.jsonl").write_text(text)
    refused(capsys, ["report", tmp_path], match)
    assert listing(tmp_path) == {"results.jsonl"}


# ----------------------------------------------------------------- full disks and read-only folders


@pytest.fixture(params=[errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EROFS])
def failing_fsync(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Every fsync fails as a full disk / too large / no permission / read-only fs would (running as
    root, a chmod would not stop the writes: patching the write is the portable fault)."""
    code = int(request.param)

    def fail(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    return code


def test_write_errors_are_one_line_naming_the_path_and_leave_nothing(
    llama: Path, tmp_path: Path, failing_fsync: int, capsys: pytest.CaptureFixture[str]
) -> None:
    name = errno.errorcode[failing_fsync]
    out = tmp_path / "released"
    argv = ["defend", llama, "-o", out, "--alpha", 10, "--top-k", 1]
    line = refused(capsys, argv, f"({name})")
    assert str(out) in line and listing(tmp_path) == set()  # no OUT, no temporary sibling

    line = refused(capsys, [*argv, "--streaming"], f"({name})")
    partial = tmp_path / ".released.partial"
    assert "rerun the same command to resume" in line and str(partial) in line
    assert not out.exists() and partial.is_dir()  # kept: a rerun resumes it

    config = tmp_path / "c.yaml"
    config.write_text(YAML.replace("steps: 2", "steps: 1"))
    run_dir = tmp_path / "run"
    line = refused(capsys, ["run", config, "--out", run_dir], f"({name})")
    assert str(run_dir) in line and not (run_dir / "results.jsonl").exists()

    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "results.jsonl").write_text(json.dumps({"run_id": "x", "kind": "attack"}) + "\n")
    refused(capsys, ["report", rows], f"({name})")
    assert not (rows / "report.md").exists()
