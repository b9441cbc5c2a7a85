"""Property-based fuzzing of the CLI's argument values (issue 13, acceptance 4): for ``defend``,
``attack``, ``curvature`` and ``run``, at least :data:`EXAMPLES` generated argument sets each, drawn
from valid values (tiny models only: mlp-digits, a one-step attack config) mixed with hostile ones
(negative, zero, NaN, huge, text, bad regexes, files where folders belong, the source as output…).

The property: the exit code is 0 or 2, stderr never holds a traceback, and an exit 2 writes
nothing (the example's folder, also the working directory, is unchanged). ``main`` is called
in-process (stderr captured, ``SystemExit`` from argparse caught) so 2000 invocations cost seconds,
not the minutes 2000 interpreters would. The profile is fixed (derandomized, no example database)
so CI runs the same examples every time; each test prints and asserts its example count
(``pytest -s``), and ``SPECDEF_FUZZ_SLOW=1`` lists argument sets slower than 0.5 s.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from specdef.cli import main

EXAMPLES = 500
PROFILE = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # a failure is reported as found, unshrunk
    suppress_health_check=list(HealthCheck),
)

CONFIG = """name: fuzz
kind: attack
model: mlp-digits
task: digits
attack: {optimizer: adam, lr: 1.0e-3, steps: 1, eval_every: 1, batch_size: 8}
seeds: [0]
"""

# values every option may receive from a hostile user (never a NUL: a shell cannot pass one)
HOSTILE = st.sampled_from(
    ["", " ", "-1", "0", "-0", "1.5", "nan", "inf", "-inf", "1e309", "1e-400", "abc", "1,2", ",",
     "-", "--", "x=y", "re:(x", "re:[", "../../etc", "/etc/passwd", "☃", "{FILE}", "{TMP}",
     "0x10", "1_0"]
)  # fmt: skip
TEXT = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6
).filter(lambda s: not s.strip().lstrip("+-").replace("_", "").isdigit())  # no huge valid ints
BAD = st.one_of(HOSTILE, TEXT)


def mix(*valid: str) -> st.SearchStrategy[str]:
    """A valid value or a hostile one, even odds (so only a few argument sets are
    valid throughout and actually load a model)."""
    good = st.sampled_from(valid)
    return st.integers(0, 1).flatmap(lambda i: BAD if i < 1 else good)


def options(spec: dict[str, st.SearchStrategy[str] | None]) -> st.SearchStrategy[list[str]]:
    """Any subset of the options (``None``: a flag), each with its drawn value, in a drawn order."""
    keys = sorted(spec)

    @st.composite
    def build(draw: st.DrawFn) -> list[str]:
        chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=5))
        argv: list[str] = []
        for key in chosen:
            value = spec[key]
            argv += [key] if value is None else [key, draw(value)]
        return argv

    return build()


DEFEND = options({
    "--targets": mix("all-linear", "layers.0", "re:layers\\.[02]"), "--exclude": mix("layers.2"),
    "--n-random": mix("1", "2"), "--seed": mix("0", "7"), "--method": mix("exact", "randomized"),
    "--dtype": mix("float32", "float64"), "--tolerance": mix("1e-3", "0.05"),
    "--mode": mix("algorithm1", "native"), "--threads": mix("1"), "--force": None,
    "--overwrite": None, "--json": None, "--streaming": None,
})  # fmt: skip
ATTACK = options({
    "--optimizer": mix("adam", "sgd", "adam,sgd"), "--seeds": mix("0", "0,1"), "--batch-size": mix("4", "16"),
    "--grad-accum": mix("1", "2"), "--schedule": mix("constant", "cosine", "linear"),
    "--warmup": mix("0", "1"), "--weight-decay": mix("0.0", "0.01"), "--grad-clip": mix("1.0"),
    "--precision": mix("fp32"), "--eval-every": mix("1", "2"), "--train": mix("all"),
    "--threshold": mix("harmful_accuracy>=0.5", "0.5", "harmful_loss<=1.5"),
    "--divergence-factor": mix("10"), "--opt-arg": mix("eps=1e-8"),
    "--adaptive": mix("fuse", "untouched"), "--max-length": mix("32"), "--eval-limit": mix("8"),
    "--search": BAD, "--lr-range": BAD, "--pruner": BAD, "--min-resource": BAD,
    "--stale-after": BAD, "--edge-steps": BAD, "--out": mix("{OUT}"), "--threads": mix("1"),
    "--stop-at-threshold": None, "--json": None,
})  # fmt: skip
CURVATURE = options({
    "--block": mix("all", "compensation", "inflated", "untouched"), "--top": mix("1", "2"),
    "--tol": mix("1e-3"), "--batches": mix("1", "2"),
    "--batch-size": mix("2", "8"), "--seed": mix("0", "3"), "--dtype": mix("float32", "float64"),
    "--alpha": mix("10", "1e3"), "--top-k": mix("1", "2"), "--targets": mix("all-linear"),
    "--max-pairs": mix("1", "2"), "--bound-iters": mix("2", "3"), "--max-length": mix("16"),
    "--threads": mix("1"), "--compare": None, "--no-bounds": None, "--json": None,
})  # fmt: skip
SETS = st.lists(
    mix("attack.steps=1", "attack.lr=1e-2", "seeds=[0, 1]", "defense.alpha=10",
        "defense.top_k=1", "defense.alpha=null", "attack.optimizer=sgd", "grid.attack.lr=[1e-3]",
        "attack.steps=forty", "attack.stepz=1", "defense.alpha=0.5", "seeds=[0.5]",
        "defense.topk=1", "model=tiny-llama", "model=nope", "task=nope", "kind=nope",
        "grid.attack.lr=[]", "attack.lr=-1", "attack.batch_size=0", "name=../x"),
    max_size=3,
)  # fmt: skip
RUN = options({
    "--limit": mix("0", "1"), "--threads": mix("1"), "--dry-run": None, "--json": None,
})  # fmt: skip


@contextlib.contextmanager
def example_dir(root: Path) -> Iterator[Path]:
    """A fresh folder holding a plain file and the tiny config; the working directory meanwhile."""
    with tempfile.TemporaryDirectory(dir=root) as name:
        where = Path(name)
        (where / "file.txt").write_text("not a model\n")
        (where / "config.yaml").write_text(CONFIG)
        with contextlib.chdir(where):
            yield where


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def check(argv: list[str], root: Path) -> int:
    """Run ``specdef ARGV`` in-process; assert the property; return the exit code."""
    with example_dir(root) as where:
        values = {"{OUT}": str(where / "out"), "{FILE}": str(where / "file.txt"),
                  "{TMP}": str(where), "{CONFIG}": str(where / "config.yaml")}  # fmt: skip
        for key, value in values.items():
            argv = [a.replace(key, value) for a in argv]
        before = listing(where)
        err, out = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse: usage error (2), --help (0)
                code = exit_.code if isinstance(exit_.code, int) else 2
        if os.environ.get("SPECDEF_FUZZ_SLOW") and time.perf_counter() - start > 0.5:
            print(f"slow {time.perf_counter() - start:.1f}s {argv}", file=sys.__stderr__)
        text = err.getvalue()
        assert code in (0, 2), (argv, code, text[-2000:])
        assert "Traceback" not in text, (argv, text[-2000:])
        if code == 2:
            assert listing(where) == before, (argv, sorted(listing(where) - before), text)
    return code


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _fuzz(
    name: str,
    strategy: st.SearchStrategy[list[str]],
    root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    codes: list[int] = []

    @PROFILE
    @given(argv=strategy)
    def one(argv: list[str]) -> None:
        codes.append(check(argv, root))

    one()
    with capsys.disabled():
        print(f"\nfuzz {name}: {len(codes)} argument sets, {codes.count(0)} exit 0, "
              f"{codes.count(2)} exit 2")  # fmt: skip
    assert len(codes) >= EXAMPLES
    assert codes.count(0) > 0 and codes.count(2) > 0  # both sides of the property were exercised


MODELS = st.sampled_from(["mlp-digits"] * 6 + ["nope", "{FILE}", "{TMP}", "", "tiny-llam"])
DATA = st.sampled_from(["digits"] * 6 + ["digits-benign", "harmful-qa", "nope", "jsonl:{FILE}",
                                         "dataset:{TMP}", "jsonl:/nonexistent", ""])  # fmt: skip


def test_fuzz_defend(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = st.sampled_from(["{OUT}"] * 6 + ["{FILE}", "{TMP}", "", "{OUT}/../file.txt"])
    strategy = st.builds(
        lambda m, o, a, k, rest: ["defend", m, "-o", o, "--alpha", a, "--top-k", k, *rest],
        MODELS, out, mix("10", "1e3", "2.5"), mix("1", "2"), DEFEND,
    )  # fmt: skip
    _fuzz("defend", strategy, root, capsys)


def test_fuzz_attack(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the budget is always bounded (the defaults, 3 rates × 100 steps, cost seconds per set)
    strategy = st.builds(
        lambda m, d, s, lr, rest: ["attack", m, "--data", d, "--steps", s, "--lr", lr, *rest],
        MODELS, DATA, mix("1", "2"), mix("1e-3", "1e-2,1e-3"), ATTACK,
    )  # fmt: skip
    _fuzz("attack", strategy, root, capsys)


def test_fuzz_curvature(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    strategy = st.builds(
        lambda m, d, h, rest: ["curvature", m, "--data", d, "--max-hvps", h, *rest],
        MODELS, DATA, mix("2", "4"), CURVATURE,
    )  # fmt: skip
    _fuzz("curvature", strategy, root, capsys)


def test_fuzz_run(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = st.sampled_from(["{CONFIG}"] * 6 + ["{FILE}", "{TMP}", "E99", "nope.yaml", ""])
    out = st.sampled_from(["{OUT}"] * 6 + ["{FILE}", "{CONFIG}"])

    def argv(c: str, o: str, sets: list[str], rest: list[str]) -> list[str]:
        return ["run", c, "--out", o, *[f"--set={s}" for s in sets], *rest]

    _fuzz("run", st.builds(argv, config, out, SETS, RUN), root, capsys)
