"""specdef.errors: the "did you mean" message every unknown-name error uses."""

from __future__ import annotations

from specdef.errors import did_you_mean


def test_did_you_mean() -> None:
    msg = did_you_mean("adamww", ["adam", "adamw", "sgd"], what="optimizer")
    assert msg.startswith("Unknown optimizer 'adamww'. Did you mean: adamw")
    assert "Available: adam, adamw, sgd" in msg
    assert "\n" not in msg


def test_write_error_names_the_file_and_the_errno() -> None:
    import errno

    from specdef.errors import WriteError, write_error

    full = write_error(OSError(errno.ENOSPC, "No space left on device"), "out/results.jsonl")
    assert isinstance(full, WriteError)
    assert str(full).startswith(
        "Cannot write 'out/results.jsonl': No space left on device (ENOSPC)"
    )
    named = OSError(errno.EACCES, "Permission denied", "out/model.safetensors")
    assert str(write_error(named, "out/x")).startswith("Cannot write 'out/model.safetensors'")
    elsewhere = OSError(errno.EACCES, "Permission denied", "/src/config.json")
    assert str(write_error(elsewhere, "out/x")).startswith("Cannot access '/src/config.json'")
