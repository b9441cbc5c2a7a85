"""specdef.utils.files: atomic writes, JSONL resume semantics, marked-region rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdef.errors import SpecdefError
from specdef.utils.files import (
    append_jsonl,
    atomic_directory,
    read_jsonl,
    replace_markdown_section,
    replace_marked_region,
    write_json_atomic,
)


def test_read_jsonl_skips_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"a": 2})
    with open(path, "a") as handle:
        handle.write('{"a": 3')  # a kill mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("crash")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_refuses_existing(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with (
        pytest.raises(SpecdefError, match=r"already exists.*--overwrite"),
        atomic_directory(tmp_path / "out"),
    ):
        pass


def test_write_json_atomic_roundtrip(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "m.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": [1, 2]}


def test_replace_markdown_section_touches_only_its_section(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nb stays\n")
    replace_markdown_section(doc, "## A", "## A\n\nnew a\n")
    assert doc.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nb stays\n"
    replace_markdown_section(doc, "## B", "## B\n\nnew b\n")
    replace_markdown_section(doc, "## C", "## C\n\nc\n")
    assert doc.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nnew b\n\n## C\n\nc\n"


def test_replace_marked_region_keeps_markers_and_surroundings(tmp_path: Path) -> None:
    doc = tmp_path / "p.md"
    doc.write_text("intro\n<!-- a -->\nold\n<!-- /a -->\noutro\n")
    replace_marked_region(doc, "<!-- a -->", "<!-- /a -->", "\nnew\n")
    assert doc.read_text() == "intro\n<!-- a -->\nnew\n<!-- /a -->\noutro\n"
    with pytest.raises(SpecdefError, match="lacks the markers"):
        replace_marked_region(doc, "<!-- b -->", "<!-- /b -->", "x")


def test_confined_paths_stay_inside_their_directory(tmp_path: Path) -> None:
    from specdef.utils.files import confined

    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"x")
    assert (
        confined(root, "model.safetensors", what="index") == (root / "model.safetensors").resolve()
    )
    assert confined(root, "sub/a.safetensors", what="index").parent == (root / "sub").resolve()
    outside = tmp_path / "secret"
    outside.write_text("s")
    (root / "link.safetensors").symlink_to(outside)
    for bad, message in [
        ("../secret", "leaves"),
        ("/etc/passwd", "leaves"),
        ("sub/../../secret", "leaves"),
        ("~/x", "leaves"),
        ("link.safetensors", "symlink"),
        ("", "expected a file name"),
        (None, "expected a file name"),
        (3, "expected a file name"),
    ]:
        with pytest.raises(SpecdefError, match=message):
            confined(root, bad, what="index")
