"""Experiments as data: a YAML config → frozen dataclasses → a grid of runs → ``results.jsonl``.

A config names a model, a task, a base defense, a base attack, a ``grid`` of values to sweep and the
seeds. The grid is nested like the config and every list in it is one axis::

    defense: {alpha: null, top_k: 8, targets: all-linear}   # alpha: null = undefended
    attack:  {optimizer: adam, lr: 1.0e-3, steps: 300}
    grid:
      defense: {alpha: [null, 1.0e2, 1.0e4]}
      attack:  {optimizer: [sgd, adam], lr: [1.0e-4, 1.0e-3]}
    seeds: [0, 1, 2]

expands to 3 × 2 × 2 × 3 runs. ``--set key=value`` overrides any value by a dotted key
(``attack.steps=5``, ``model=tiny-llama``, ``seeds=[0]``); setting a key that is also a grid axis
replaces that axis by the single value. Each run gets a ``run_id`` (a hash of its resolved spec), so a
rerun of the same config skips finished runs (:mod:`specdef.sweep` does the resuming).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from specdef._io import append_jsonl, read_jsonl, write_text_atomic
from specdef.errors import SpecdefError, did_you_mean

KINDS = ("attack", "curvature", "utility")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "experiments"
RESOLVED_NAME = "config.yaml"
RESULTS_NAME = "results.jsonl"
VARIANTS = "variants"  # grid key: a list of {dotted key: value} mappings, one axis


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.yaml_implicit_resolvers = copy.deepcopy(yaml.SafeLoader.yaml_implicit_resolvers)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as YAML (``5`` → int, ``1e-3`` → float, ``[0,1]`` → list, ``null``)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment. Every field is plain data; ``defense`` / ``attack`` / ``measure`` are passed
    to the components that own them (``SpecDefConfig``, ``AttackSpec``, the measurement of the kind).
    """

    name: str  # short id, e.g. "E2-vision"; the default run directory is runs/<name>
    kind: (
        str  # "attack" (fine-tuning runs), "curvature" (σ₁(H) and bounds), "utility" (function gap)
    )
    model: str | Mapping[str, Any]  # a zoo model name, or {name, architecture, <kwargs>}
    task: str  # a zoo task name: what is attacked / measured on
    description: str = ""
    claim: str = ""  # which of the paper's claims this experiment tests
    defense: Mapping[str, Any] = field(
        default_factory=dict
    )  # SpecDefConfig fields; alpha null = none
    attack: Mapping[str, Any] = field(default_factory=dict)  # AttackSpec fields
    measure: Mapping[str, Any] = field(default_factory=dict)  # kind-specific measurement options
    data: Mapping[str, Any] = field(default_factory=dict)  # task / model loading options
    grid: Mapping[str, Any] = field(default_factory=dict)  # nested like the config; lists are axes
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecdefError(did_you_mean(self.kind, KINDS, what="experiment kind"))
        if not self.seeds:
            raise SpecdefError(f"Experiment {self.name!r} has no seeds; give e.g. seeds: [0].")
        for axis, values in grid_axes(self.grid):
            if not values:
                raise SpecdefError(
                    f"Grid axis {axis!r} of {self.name!r} is empty; give at least one value."
                )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["seeds"] = list(self.seeds)
        return _plain(out)


@dataclass(frozen=True)
class RunSpec:
    """One resolved run: the config with every grid axis fixed to one value, and one seed."""

    experiment: str
    kind: str
    model: str | Mapping[str, Any]
    task: str
    defense: Mapping[str, Any]
    attack: Mapping[str, Any]
    measure: Mapping[str, Any]
    data: Mapping[str, Any]
    seed: int

    @property
    def run_id(self) -> str:
        """A stable hash of everything that determines the run's outcome (not the experiment name,
        so the same run in two experiments is the same run)."""
        spec = {k: v for k, v in self.to_dict().items() if k != "experiment"}
        blob = json.dumps(spec, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @property
    def defended(self) -> bool:
        return self.defense.get("alpha") is not None


_FIELDS = {f.name for f in dataclasses.fields(ExperimentConfig)}
_SECTIONS = ("defense", "attack", "measure", "data", "grid")


def _plain(obj: Any) -> Any:
    """Mappings → dicts, tuples → lists, recursively (what YAML and JSON write)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def grid_axes(grid: Mapping[str, Any], prefix: str = "") -> list[tuple[str, list[Any]]]:
    """The grid's axes as ``(dotted key, values)``, in config order. The top-level key
    ``variants`` is one axis whose values are mappings ``{dotted key: value}`` set together."""
    axes: list[tuple[str, list[Any]]] = []
    for key, value in grid.items():
        path = f"{prefix}{key}"
        if path == VARIANTS:
            if not isinstance(value, list | tuple) or not all(
                isinstance(v, Mapping) for v in value
            ):
                raise SpecdefError(
                    "grid.variants must be a list of mappings {dotted.key: value}, e.g. "
                    "[{defense.alpha: null}, {defense.alpha: 1.0e4, attack.adaptive: fuse}]."
                )
            axes.append((path, list(value)))
        elif isinstance(value, Mapping):
            axes.extend(grid_axes(value, prefix=path + "."))
        elif isinstance(value, list | tuple):
            axes.append((path, list(value)))
        else:
            axes.append((path, [value]))
    return axes


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise SpecdefError(
                f"Cannot set {dotted!r}: {key!r} holds {child!r}, not a section; "
                f"set {key!r} itself instead."
            )
        node = child
    node[keys[-1]] = value


def _drop_grid_axis(grid: dict[str, Any], dotted: str) -> None:
    keys = dotted.split(".")
    node: Any = grid
    for key in keys[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    if isinstance(node, dict):
        node.pop(keys[-1], None)


def _check_key(key: str) -> None:
    top = key.split(".")[0]
    if top not in _FIELDS:
        raise SpecdefError(did_you_mean(top, _FIELDS, what="config key"))
    if "." in key and top not in (*_SECTIONS, "model"):
        raise SpecdefError(f"Config key {top!r} is a value, not a section; use --set {top}=VALUE.")


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a raw config mapping.

    Setting a key that is a grid axis (``attack.lr=1e-3`` while ``grid.attack.lr`` exists) pins that
    axis to the one value. ``grid.X=[…]`` replaces an axis or adds one.
    """
    out: dict[str, Any] = copy.deepcopy(_plain(dict(data)))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecdefError(
                f"Expected --set KEY=VALUE (e.g. attack.steps=5), found {item!r}; add '=VALUE'."
            )
        _check_key(key)
        top = key.split(".")[0]
        value = parse_value(text)
        if top != "grid":
            grid = out.setdefault("grid", {}) or {}
            _drop_grid_axis(grid, key)
            if isinstance(grid.get(VARIANTS), list):  # the override wins inside variants too
                for item in grid[VARIANTS]:
                    if isinstance(item, dict):
                        item.pop(key, None)
        _set_path(out, key, value)
    return out


def config_from_mapping(data: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig` (unknown keys are errors)."""
    if not isinstance(data, Mapping):
        raise SpecdefError(f"Expected a YAML mapping in {source}, found {type(data).__name__}.")
    unknown = [k for k in data if k not in _FIELDS]
    if unknown:
        raise SpecdefError(f"In {source}: " + did_you_mean(str(unknown[0]), _FIELDS, what="key"))
    missing = [k for k in ("name", "kind", "model", "task") if k not in data]
    if missing:
        raise SpecdefError(f"{source} lacks required key {missing[0]!r}; add it.")
    kwargs = dict(data)
    for section in _SECTIONS:
        value = kwargs.get(section) or {}
        if not isinstance(value, Mapping):
            raise SpecdefError(
                f"In {source}: {section!r} must be a mapping, found {type(value).__name__}."
            )
        kwargs[section] = dict(value)
    seeds = kwargs.get("seeds", [0])
    kwargs["seeds"] = tuple(int(s) for s in (seeds if isinstance(seeds, list | tuple) else [seeds]))
    return ExperimentConfig(**kwargs)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or a shipped config's name / prefix (``E2`` → ``configs/…/E2-*.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    matches = [p for p in shipped if p.stem == str(name_or_path)] or [
        p for p in shipped if p.stem.split("-")[0] == str(name_or_path)
    ]
    if len(matches) == 1:
        return matches[0]
    raise SpecdefError(
        f"No config file {str(name_or_path)!r}. "
        + did_you_mean(str(name_or_path), [p.stem for p in shipped], what="shipped config")
    )


def shipped_configs() -> list[Path]:
    """The configs under ``configs/experiments`` (in a source checkout)."""
    return sorted(CONFIG_DIR.glob("*.yaml"))


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config, apply ``--set`` overrides, validate."""
    source = resolve_config_path(path)
    try:
        data = yaml.load(source.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as err:
        raise SpecdefError(
            f"Cannot parse {str(source)!r} as YAML: {err}; fix the syntax."
        ) from None
    return config_from_mapping(apply_overrides(data or {}, overrides), source=str(source))


def expand(config: ExperimentConfig) -> list[RunSpec]:
    """The grid × seeds as resolved run specs, in a stable order (grid axes in config order, the
    last axis fastest; seeds innermost)."""
    axes = grid_axes(config.grid)
    base = config.to_dict()
    runs: list[RunSpec] = []
    for combo in itertools.product(*(values for _, values in axes)):
        data = copy.deepcopy(base)
        for (key, _), value in zip(axes, combo, strict=True):
            if key == VARIANTS:
                for inner, item in value.items():
                    _check_key(str(inner))
                    _set_path(data, str(inner), copy.deepcopy(item))
            else:
                _set_path(data, key, copy.deepcopy(value))
        if data["defense"].get("alpha") is None:
            data["defense"] = {"alpha": None}  # undefended: the other defense fields are moot
        for seed in config.seeds:
            runs.append(
                RunSpec(
                    experiment=config.name,
                    kind=config.kind,
                    model=data["model"],
                    task=data["task"],
                    defense=data["defense"],
                    attack=data["attack"],
                    measure=data["measure"],
                    data=data["data"],
                    seed=seed,
                )
            )
    seen: set[str] = set()
    unique = []
    for run in runs:
        if run.run_id not in seen:  # undefended runs repeat across a grid of defense fields
            seen.add(run.run_id)
            unique.append(run)
    return unique


def iter_runs(config: ExperimentConfig) -> Iterator[RunSpec]:
    yield from expand(config)


def default_run_dir(config: ExperimentConfig, overrides: Sequence[str] = ()) -> Path:
    """``runs/<name>``, or ``runs/<name>-<hash of the overrides>`` when ``--set`` was used, so a
    miniature run never mixes its rows into the full experiment's."""
    if not overrides:
        return Path("runs") / config.name
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    return Path("runs") / f"{config.name}-{digest}"


def prepare_run_dir(config: ExperimentConfig, run_dir: str | Path) -> Path:
    """Create the run directory and write the resolved config into it. A directory holding a
    different resolved config is refused (its rows would mix two experiments)."""
    path = Path(run_dir)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    existing = path / RESOLVED_NAME
    if existing.exists() and existing.read_text(encoding="utf-8") != text:
        raise SpecdefError(
            f"Run directory {str(path)!r} holds a different resolved config; rerun with the same "
            "config and --set values to resume, or choose another --out."
        )
    if path.exists() and not path.is_dir():
        raise SpecdefError(f"Run directory {str(path)!r} is a file; choose another --out.")
    write_text_atomic(existing, text)
    return path


@dataclass(frozen=True)
class RunSummary:
    """What :func:`run_experiment` did."""

    run_dir: Path
    total: int  # runs in the expanded grid
    skipped: int  # already in results.jsonl (resumed)
    ran: int  # executed now
    seconds: float

    @property
    def results(self) -> Path:
        return self.run_dir / RESULTS_NAME


def make_row(run: RunSpec, outcome: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """One results row: identity and resolved spec, then the outcome, wall time and provenance."""
    from specdef.provenance import provenance

    model = run.model
    row: dict[str, Any] = {
        "run_id": run.run_id,
        "experiment": run.experiment,
        "kind": run.kind,
        "model": model if isinstance(model, str) else str(model.get("name", "model")),
        "model_spec": _plain(model),
        "task": run.task,
        "seed": run.seed,
        "alpha": run.defense.get("alpha"),
        "defense": _plain(run.defense),
        "attack": _plain(run.attack),
        "measure": _plain(run.measure),
        "data": _plain(run.data),
    }
    if run.kind == "attack":  # the fields specdef.sweep.make_row puts at the top level
        for key in ("optimizer", "lr", "train", "threshold"):
            if key in run.attack:
                row[key] = run.attack[key]
        if run.attack.get("train") == "lora":
            row["lora_targets"] = _plain(run.attack.get("lora_targets"))
    row.update(outcome)
    row["wall_s"] = round(seconds, 3)
    row["provenance"] = provenance()
    return row


def run_experiment(
    config: ExperimentConfig,
    *,
    run_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    limit: int | None = None,
) -> RunSummary:
    """Expand ``config`` and execute every run not yet in ``RUN_DIR/results.jsonl`` (one row
    appended per finished run, so a killed experiment resumes where it stopped). ``limit`` caps
    how many runs execute in this call."""
    import time

    from specdef.progress import track

    path = prepare_run_dir(config, run_dir or default_run_dir(config, overrides))
    runs = expand(config)
    start = time.perf_counter()
    done = _run_resumable(
        runs,
        path / RESULTS_NAME,
        key=lambda run: run.run_id,
        execute=_execute_row,
        limit=limit,
        progress=lambda items, total: track(items, config.name, total=total),
    )
    return RunSummary(path, len(runs), done.skipped, done.ran, time.perf_counter() - start)


def _execute_row(run: RunSpec) -> dict[str, Any]:
    import time

    from specdef.runners import execute

    start = time.perf_counter()
    outcome = execute(run)
    return make_row(run, outcome, time.perf_counter() - start)


@dataclass(frozen=True)
class _Done:
    skipped: int
    ran: int


def _run_resumable(
    items: Sequence[RunSpec],
    results: Path,
    *,
    key: Callable[[RunSpec], str],
    execute: Callable[[RunSpec], dict[str, Any]],
    limit: int | None,
    progress: Callable[[list[RunSpec], int], Iterable[RunSpec]],
) -> _Done:
    """Run the items whose key has no row in ``results`` yet; append one row per finished item.
    Same resume contract as :func:`specdef.sweep.run_sweep` (which is specific to attack grids on
    one task; experiments mix kinds and tasks): a line cut short by a kill is dropped first."""
    from specdef.sweep import drop_partial_line

    drop_partial_line(results)
    finished = {row.get("run_id") for row in read_jsonl(results)}
    todo = [item for item in items if key(item) not in finished]
    if limit is not None:
        todo = todo[: max(limit, 0)]
    for item in progress(todo, len(todo)):
        append_jsonl(results, execute(item))
    return _Done(
        skipped=len(items) - len([i for i in items if key(i) not in finished]), ran=len(todo)
    )
