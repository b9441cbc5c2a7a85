"""specdef.errors: the "did you mean" message every unknown-name error uses."""

from __future__ import annotations

from specdef.errors import did_you_mean


def test_did_you_mean() -> None:
    msg = did_you_mean("adamww", ["adam", "adamw", "sgd"], what="optimizer")
    assert msg.startswith("Unknown optimizer 'adamww'. Did you mean: adamw")
    assert "Available: adam, adamw, sgd" in msg
    assert "\n" not in msg
