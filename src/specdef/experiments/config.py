"""Experiment configs as data: YAML → :class:`ExperimentConfig` → the grid of :class:`RunSpec`.

Parsing (a YAML loader where ``1e-3`` is a float), ``--set`` overrides by dotted key, validation
(unknown keys are errors, with a suggestion), shipped configs by name, and the grid expansion with
its stable ``run_id`` per run. Nothing here runs anything or touches a run directory: that is
:mod:`specdef.experiments.run`, which re-exports these names.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdef.errors import SpecdefError, did_you_mean
from specdef.utils.safe_yaml import load_yaml

KINDS = ("attack", "curvature", "utility", "detection", "landscape", "relearn")
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "experiments"
VARIANTS = "variants"  # grid key: a list of {dotted key: value} mappings, one axis


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as YAML (``5`` → int, ``1e-3`` → float, ``[0,1]`` → list, ``null``)."""
    try:
        return load_yaml(text, what=f"--set value {text!r}")
    except SpecdefError:
        return text


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment. Every field is plain data; ``defense`` / ``attack`` / ``measure`` are passed
    to the components that own them (``SpecDefConfig``, ``AttackSpec``, the measurement of the kind).
    """

    name: str  # short id, e.g. "E2-vision"; the default run directory is runs/<name>
    # "attack" (fine-tuning runs), "curvature" (σ₁(H) and bounds), "utility" (function gap),
    # "detection" (find defended layers without the manifest), "landscape" (size, gap, σ₁(H) and
    # imbalance of the model the attacker faces)
    kind: str
    model: str | Mapping[str, Any]  # a zoo model name, or {name, architecture, <kwargs>}
    task: str = ""  # a zoo task name: what is attacked / measured on ("" only for detection)
    description: str = ""
    claim: str = ""  # which of the paper's claims this experiment tests
    # SpecDefConfig fields (alpha null = none), or {name: NAME, <its config keys>} for a defense
    # of specdef.defenses (npo, rmu, tar, …; name specdef / native keep the SpecDef fields)
    defense: Mapping[str, Any] = field(default_factory=dict)
    attack: Mapping[str, Any] = field(default_factory=dict)  # AttackSpec fields
    measure: Mapping[str, Any] = field(default_factory=dict)  # kind-specific measurement options
    data: Mapping[str, Any] = field(default_factory=dict)  # task / model loading options
    grid: Mapping[str, Any] = field(default_factory=dict)  # nested like the config; lists are axes
    seeds: tuple[int, ...] = (0,)
    # attack kind only: the worst-case attacker, an Optuna study per grid cell instead of one run
    # (trials, optimizers, stability_edge and the SearchConfig fields; specdef.experiments.search)
    search: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecdefError(did_you_mean(self.kind, KINDS, what="experiment kind"))
        if not self.task and self.kind != "detection":
            raise SpecdefError(
                f"Experiment {self.name!r} ({self.kind}) needs a task; add e.g. task: digits-harmful."
            )
        if not self.seeds:
            raise SpecdefError(f"Experiment {self.name!r} has no seeds; give e.g. seeds: [0].")
        if self.search and self.kind != "attack":
            raise SpecdefError(
                f"Experiment {self.name!r} ({self.kind}) has a search block; only attack "
                "experiments search (remove search:)."
            )
        if self.search and "optimizers" in self.search and _has_axis(self.grid, "attack.optimizer"):
            raise SpecdefError(
                f"Experiment {self.name!r} gives the optimizers twice (search.optimizers and "
                "grid.attack.optimizer); keep one."
            )
        for axis, values in grid_axes(self.grid):
            if not values:
                raise SpecdefError(
                    f"Grid axis {axis!r} of {self.name!r} is empty; give at least one value."
                )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["seeds"] = list(self.seeds)
        if not out["search"]:  # unsearched configs resolve exactly as before the search block
            del out["search"]
        return plain_data(out)


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
    search: Mapping[str, Any] = field(default_factory=dict)  # a searched cell: its search block

    @property
    def run_id(self) -> str:
        """A stable hash of everything that determines the run's outcome (not the experiment name,
        so the same run in two experiments is the same run). A searched cell's id hashes its search
        block except what does not change the study (trial count, storage, staleness, the
        optimizer list: the cell's optimizer is ``attack.optimizer``)."""
        spec = {k: v for k, v in self.to_dict().items() if k != "experiment"}
        search = {k: v for k, v in spec.pop("search").items() if k not in SEARCH_VOLATILE}
        if search:
            spec["search"] = search
        blob = json.dumps(spec, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return plain_data(dataclasses.asdict(self))

    @property
    def defended(self) -> bool:
        """SpecDef with an ``alpha``, or a registry defense named by ``defense.name``."""
        name = self.defense.get("name")
        return self.defense.get("alpha") is not None or (
            isinstance(name, str) and name not in ("specdef", "native")
        )


_FIELDS = {f.name for f in dataclasses.fields(ExperimentConfig)}
_SECTIONS = ("defense", "attack", "measure", "data", "grid", "search")
# search-block keys that leave a cell's study the same (see RunSpec.run_id)
SEARCH_VOLATILE = ("trials", "storage", "stale_after", "optimizers")


def _has_axis(grid: Mapping[str, Any], dotted: str) -> bool:
    return any(key == dotted for key, _ in grid_axes(grid)) or any(
        dotted in item for item in grid.get(VARIANTS) or () if isinstance(item, Mapping)
    )


def plain_data(obj: Any) -> Any:
    """Mappings → dicts, tuples → lists, recursively (what YAML and JSON write)."""
    if isinstance(obj, Mapping):
        return {str(k): plain_data(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain_data(v) for v in obj]
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
    out: dict[str, Any] = copy.deepcopy(plain_data(dict(data)))
    for item in overrides:
        if not isinstance(item, str):  # argparse hands `--set=--` over as a list
            raise SpecdefError(f"Expected --set KEY=VALUE (e.g. attack.steps=5), found {item!r}.")
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
    missing = [k for k in ("name", "kind", "model") if k not in data]
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
    seeds = seeds if isinstance(seeds, list | tuple) else [seeds]
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise SpecdefError(
            f"seeds must be integers, found {bad[0]!r} in {list(seeds)!r}; e.g. seeds: [0, 1, 2]."
        )
    kwargs["seeds"] = tuple(seeds)
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
    if matches:
        names = ", ".join(p.stem for p in matches)
        raise SpecdefError(
            f"{str(name_or_path)!r} names {len(matches)} shipped configs ({names}); give the full name."
        )
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
    data = load_yaml(source.read_text(encoding="utf-8"), what=repr(str(source)))
    if data is not None and not isinstance(data, Mapping):
        raise SpecdefError(
            f"Expected a YAML mapping in {str(source)!r}, found {type(data).__name__}; a config "
            "has name, kind, model, task, … keys."
        )
    return config_from_mapping(apply_overrides(data or {}, overrides), source=str(source))


def expand(config: ExperimentConfig) -> list[RunSpec]:
    """The grid × seeds as resolved run specs, in a stable order (grid axes in config order, the
    last axis fastest; seeds innermost)."""
    axes = grid_axes(config.grid)
    optimizers = config.search.get("optimizers") if config.search else None
    if optimizers:  # a searched experiment: one study per optimizer, an axis before the seeds
        names = optimizers if isinstance(optimizers, list | tuple) else [optimizers]
        axes.append(("attack.optimizer", list(names)))
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
        name = data["defense"].get("name")
        named = isinstance(name, str) and name not in ("specdef", "native")
        if data["defense"].get("alpha") is None and not named:
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
                    search=data.get("search") or {},
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
