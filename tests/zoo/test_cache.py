"""The zoo cache: a build runs once under concurrent preparers, and a deleted, truncated, edited or
half-written entry is detected and rebuilt, never used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from specdef import zoo
from specdef.zoo import _cache

BUILDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from specdef.zoo._cache import ensure_entry

    root, log = sys.argv[1], Path(sys.argv[2])

    def build(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        (tmp / "weights.bin").write_bytes(bytes(range(256)) * 1000)
        return {"builder": os.getpid()}

    path, manifest = ensure_entry("models", "demo", build, cache_dir=root)
    print(path, manifest["meta"]["builder"], (path / "weights.bin").stat().st_size)
    """
)


def _counting_builder(calls: list[int], payload: bytes = b"x" * 4096):
    def build(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(payload)
        (tmp / "config.json").write_text("{}")
        return {"n": len(calls)}

    return build


def test_two_processes_build_once(tmp_path):
    log = tmp_path / "builds.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(tmp_path / "cache"), str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(log.read_text().split()) == 1  # one build
    assert outs[0] == outs[1] and outs[0][2] == "256000"  # both see the same finished entry


def test_reuses_a_valid_entry(tmp_path):
    calls: list[int] = []
    p1, m1 = _cache.ensure_entry("models", "k", _counting_builder(calls), cache_dir=tmp_path)
    p2, m2 = _cache.ensure_entry("models", "k", _counting_builder(calls), cache_dir=tmp_path)
    assert p1 == p2 and m1 == m2 and len(calls) == 1
    assert set(m1["files"]) == {"sub/weights.bin", "config.json"}


@pytest.mark.parametrize(
    "damage",
    ["delete-file", "truncate", "flip-byte", "delete-manifest", "garble-manifest", "delete-entry"],
)
def test_damaged_entry_is_rebuilt(tmp_path, damage):
    calls: list[int] = []
    path, _ = _cache.ensure_entry("models", "k", _counting_builder(calls), cache_dir=tmp_path)
    weights = path / "sub" / "weights.bin"
    if damage == "delete-file":
        weights.unlink()
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip-byte":  # same size: caught by the changed mtime and then the SHA-256
        with open(weights, "r+b") as f:
            f.seek(2000)
            f.write(b"y")
    elif damage == "delete-manifest":
        (path / _cache.MANIFEST).unlink()
    elif damage == "garble-manifest":
        (path / _cache.MANIFEST).write_text('{"format": 1, "fil')
    else:
        import shutil

        shutil.rmtree(path)
    assert _cache.read_manifest(path) is None
    path2, manifest = _cache.ensure_entry(
        "models", "k", _counting_builder(calls), cache_dir=tmp_path
    )
    assert path2 == path and len(calls) == 2 and manifest["meta"] == {"n": 2}
    assert weights.read_bytes() == b"x" * 4096


def test_verify_catches_an_edit_that_kept_size_and_mtime(tmp_path):
    calls: list[int] = []
    path, _ = _cache.ensure_entry("models", "k", _counting_builder(calls), cache_dir=tmp_path)
    weights = path / "sub" / "weights.bin"
    stat = weights.stat()
    weights.write_bytes(b"z" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _cache.read_manifest(path) is not None  # the cheap check cannot see it …
    assert _cache.read_manifest(path, verify=True) is None  # … the full one can
    _cache.ensure_entry("models", "k", _counting_builder(calls), cache_dir=tmp_path, verify=True)
    assert len(calls) == 2 and weights.read_bytes() == b"x" * 4096


def test_a_build_killed_midway_leaves_nothing_behind(tmp_path):
    def failing(tmp: Path) -> dict:
        (tmp / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # as if interrupted while writing

    with pytest.raises(KeyboardInterrupt):
        _cache.ensure_entry("models", "k", failing, cache_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == []
    # A crash that left a temporary directory (no rename happened) is never mistaken for the entry.
    (tmp_path / "models" / ".k.abc.tmp").mkdir()
    calls: list[int] = []
    path, _ = _cache.ensure_entry("models", "k", _counting_builder(calls), cache_dir=tmp_path)
    assert path.name == "k" and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["k"]  # the stale one is gone


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEF_CACHE", str(tmp_path / "env"))
    assert _cache.cache_root() == tmp_path / "env"
    assert _cache.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SPECDEF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache.cache_root() == tmp_path / "xdg" / "specdef"


def test_corrupted_vision_model_is_retrained_to_the_same_weights(tmp_path):
    original = zoo.load_model("mlp-digits", cache_dir=tmp_path)
    assert zoo.prepare("mlp-digits", cache_dir=tmp_path) is False  # already prepared
    (weights,) = (tmp_path / "models").glob("mlp-digits-*/model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert not any(
        r["prepared"] for r in zoo.list_models(cache_dir=tmp_path) if r["name"] == "mlp-digits"
    )
    rebuilt = zoo.load_model("mlp-digits", cache_dir=tmp_path)
    for (name, a), (_, b) in zip(
        original.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name  # the recipe is deterministic: the same weights again
