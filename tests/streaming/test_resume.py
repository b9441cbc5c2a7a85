"""A killed streaming defense resumes: rerunning the same command skips the shards it finished
(verified by sha256), writes the same bytes as an uninterrupted run, redoes a corrupted shard and
refuses to mix runs made with other options."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from specdef.cli import main
from specdef.defense.config import SpecDefConfig
from specdef.defense.step import layer_seed
from specdef.errors import SpecdefError
from specdef.io.checkpoint import MANIFEST, NATIVE_RECORD
from specdef.release.defend import DefendRequest, defend
from specdef.streaming import resume as _stream_resume
from specdef.streaming.defend import defend_streaming
from specdef.streaming.shards import open_checkpoint

ALPHA, TOP_K = 1e3, 4

# Runs the real CLI in a child process; after two shards are finished (the first written holds only
# lm_head, which all-linear leaves alone) and one tensor of the third is written, it drops a marker
# and sleeps so the test can SIGKILL it mid-shard.
CHILD = """
import sys, time
from pathlib import Path
from specdef.streaming import resume as _stream_resume
from specdef.streaming import shards as _stream_io
marker = Path(sys.argv[1])
finish, write = _stream_resume.Staging.finish, _stream_io.ShardWriter.write
done = []
def finish_spy(self, fname, **kw):
    finish(self, fname, **kw)
    done.append(fname)
def write_spy(self, name, tensor):
    write(self, name, tensor)
    if len(done) == 2:
        self._handle.flush()
        marker.write_text(" ".join([*done, Path(self._handle.name).name]))
        time.sleep(600)
_stream_resume.Staging.finish, _stream_io.ShardWriter.write = finish_spy, write_spy
from specdef.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer GQA Llama saved in 6 shards (≈200 KB each) with an HF index."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("resume") / "src"
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) >= 4
    return folder


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("*.safetensors"))
    }


def _without_provenance(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    data.pop("provenance", None)
    data.get("extra", {}).pop("source", None)
    data.get("integrity", {}).pop("manifest", None)  # hashes the provenance time; file hashes stay
    return dict(data)


def _args(src: Path, out: Path, mode: str) -> list[str]:
    return ["-v", "defend", str(src), "-o", str(out), "--streaming", "--mode", mode,
            "--alpha", str(ALPHA), "--top-k", str(TOP_K)]  # fmt: skip


@pytest.mark.parametrize("mode", ["algorithm1", "native"])
def test_sigkill_mid_shard_then_rerun_matches_uninterrupted(
    checkpoint: Path,
    tmp_path: Path,
    mode: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reference = tmp_path / "reference"
    config = SpecDefConfig(alpha=ALPHA, top_k=TOP_K)  # what the CLI below builds
    defend(
        DefendRequest(str(checkpoint), reference, config, mode=mode, streaming=True, probe=False)
    )
    out, marker = tmp_path / "out", tmp_path / "paused"
    staging = _stream_resume.staging_path(out)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(marker), *_args(checkpoint, out, mode)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.stderr.read().decode() if child.stderr else ""
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        if child.stderr:
            child.stderr.close()
    *finished, third = marker.read_text().split()
    assert not out.exists()
    assert sorted(p.name for p in (staging / "done").iterdir()) == sorted(
        f"{f}.json" for f in finished
    )
    half = (staging / "out" / third).stat().st_size
    assert 0 < half < (reference / third).stat().st_size  # killed part-way through shard 3
    before = [(staging / "out" / f).stat() for f in finished]

    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="specdef"):
        assert main(_args(checkpoint, out, mode)[1:]) == 0  # the same command again
    assert "resumed: 2 shard(s) finished by an earlier run" in capsys.readouterr().out
    for fname, old in zip(finished, before, strict=True):
        assert f"shard {fname}: finished earlier, sha256 verified; skipped" in caplog.text
        new = (out / fname).stat()  # renamed into place, never rewritten
        assert (new.st_ino, new.st_mtime_ns) == (old.st_ino, old.st_mtime_ns)
    assert f"shard {third}: finished (" in caplog.text
    if mode == "native":  # the planning pass ran before the kill: its transforms are reused
        assert "native plan: computed earlier, sha256 verified; reused" in caplog.text
    assert not staging.exists()
    assert _digests(out) == _digests(reference)  # byte-identical shards
    assert (out / "model.safetensors.index.json").read_text() == (
        reference / "model.safetensors.index.json"
    ).read_text()
    record = MANIFEST if mode == "algorithm1" else NATIVE_RECORD
    assert _without_provenance(out / record) == _without_provenance(reference / record)


def _crash_after(monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """Make the run die (not a SpecdefError) once ``shards`` shards are finished."""
    finish = _stream_resume.Staging.finish
    count = []

    def spy(self: _stream_resume.Staging, fname: str, **kw: object) -> None:
        finish(self, fname, **kw)  # type: ignore[arg-type]
        count.append(fname)
        if len(count) == shards:
            raise OSError("simulated crash")

    monkeypatch.setattr(_stream_resume.Staging, "finish", spy)


def test_corrupted_shard_redone_other_options_refused(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    defend_streaming(checkpoint, reference, SpecDefConfig(alpha=ALPHA, top_k=TOP_K))
    out = tmp_path / "out"
    staging = _stream_resume.staging_path(out)
    with monkeypatch.context() as patch:
        _crash_after(patch, 2)
        with pytest.raises(OSError, match="simulated crash"):
            defend_streaming(checkpoint, out, SpecDefConfig(alpha=ALPHA, top_k=TOP_K))
    first, second = open_checkpoint(checkpoint).files[:2]  # the order shards are written in
    assert sorted(p.name for p in (staging / "done").iterdir()) == sorted(
        [f"{first}.json", f"{second}.json"]
    )
    with pytest.raises(SpecdefError, match=r"other options \(config\.alpha: 1000\.0 → 100\.0\)"):
        defend_streaming(checkpoint, out, SpecDefConfig(alpha=100.0, top_k=TOP_K))
    assert (staging / "done" / f"{first}.json").exists()  # refusing kept the partial run

    shard = staging / "out" / first
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte in the last tensor
    shard.write_bytes(bytes(data))
    result = defend_streaming(checkpoint, out, SpecDefConfig(alpha=ALPHA, top_k=TOP_K))
    assert result.resumed_shards == (second,)  # the corrupted one was written again
    assert _digests(out) == _digests(reference)

    with monkeypatch.context() as patch:
        _crash_after(patch, 1)
        with pytest.raises(OSError, match="simulated crash"):
            defend_streaming(checkpoint, tmp_path / "o2", SpecDefConfig(alpha=ALPHA, top_k=TOP_K))
    fresh = defend_streaming(
        checkpoint, tmp_path / "o2", SpecDefConfig(alpha=100.0, top_k=TOP_K), overwrite=True
    )
    assert fresh.resumed_shards == ()  # --overwrite discarded the other run and started over
    manifest = json.loads((tmp_path / "o2" / MANIFEST).read_text())
    assert manifest["defense"]["config"]["alpha"] == 100.0


def test_native_plan_corrupted_is_recomputed_identically(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The plan is recomputed from per-pair seeds, so shards finished with the old plan still fit."""
    reference = tmp_path / "reference"
    defend_streaming(checkpoint, reference, SpecDefConfig(alpha=ALPHA, top_k=TOP_K), mode="native")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _crash_after(patch, 3)
        with pytest.raises(OSError, match="simulated crash"):
            defend_streaming(
                checkpoint, out, SpecDefConfig(alpha=ALPHA, top_k=TOP_K), mode="native"
            )
    plan = _stream_resume.staging_path(out) / "plan.safetensors"
    data = bytearray(plan.read_bytes())
    data[-5] ^= 0xFF
    plan.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="specdef"):
        result = defend_streaming(
            checkpoint, out, SpecDefConfig(alpha=ALPHA, top_k=TOP_K), mode="native"
        )
    assert "native plan: its bytes no longer match the record; planning again" in caplog.text
    assert len(result.resumed_shards) == 3
    assert _digests(out) == _digests(reference)


def test_concurrent_run_on_same_out_refused(checkpoint: Path, tmp_path: Path) -> None:
    staging = _stream_resume.staging_path(tmp_path / "out")
    staging.mkdir()
    with open(staging / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SpecdefError, match="Another specdef run is writing"):
            defend_streaming(checkpoint, tmp_path / "out", SpecDefConfig(alpha=ALPHA, top_k=TOP_K))
    assert not (tmp_path / "out").exists()


def test_layer_seed_depends_on_name_not_order() -> None:
    seeds = {layer_seed(0, f"layer.{i}") for i in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert layer_seed(0, "a") == layer_seed(0, "a")
    assert layer_seed(0, "a") != layer_seed(1, "a")
