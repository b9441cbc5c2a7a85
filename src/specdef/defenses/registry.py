"""The defense plug-in point: the :class:`Defense` protocol, one registry of entries with capability
flags, and configs built from plain data (``k=v`` strings, a YAML mapping, an experiment's
``defense:`` block) with did-you-mean errors.

A defense takes a live model (and, when its entry says ``needs_data``, the harmful and retain data
of :class:`specdef.defenses.data.DefenseData`) and returns :class:`Defended`: the model (the same
object, changed in place, or a new one when the architecture changes) and a JSON-able record of
what was done and measured. Callers read the flags, never the name:

- ``needs_data``: ``apply`` needs a :class:`DefenseData` (training defenses);
- ``training_free``: no gradient step is taken (SpecDef Algorithm 1, native);
- ``changes_architecture``: the defended model has other modules or parameter counts than the
  source (SpecDef Algorithm 1 inserts compensation layers);
- ``kinds``: the task kinds (``"classification"``, ``"causal-lm"``) the defense supports.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from specdef.errors import SpecdefError, did_you_mean
from specdef.utils.safe_yaml import load_yaml

KINDS = ("classification", "causal-lm")


@dataclass
class Defended:
    """What a defense returns: the defended ``model`` and its ``record`` (JSON-able: the defense's
    name, config, flags, citation, and what it measured — e.g. the harmful loss before/after)."""

    model: nn.Module
    record: dict[str, Any]


@runtime_checkable
class Defense(Protocol):
    """What every defense is: a ``name``, its ``config`` (a frozen dataclass instance) and
    ``apply``. Third-party defenses implement this and :func:`register_defense` an entry."""

    name: str
    config: Any

    def apply(self, model: nn.Module, data: Any | None = None) -> Defended:
        """Defend ``model`` (with ``data``, a :class:`specdef.defenses.data.DefenseData`, when the
        entry ``needs_data``); return the defended model and the record."""
        ...


ApplyFn = Callable[..., Defended]  # (model, config, data or None) -> Defended


@dataclass(frozen=True)
class DefenseEntry:
    """A registered defense: its config dataclass, its apply function and its flags."""

    name: str
    config: type  # a frozen dataclass; every field has a default
    apply: ApplyFn
    summary: str  # one line: what it changes
    cites: str  # the paper it is written from
    deviations: str  # what CPU scale forces (docs/defenses.md says more)
    needs_data: bool = False
    training_free: bool = False
    changes_architecture: bool = False
    kinds: tuple[str, ...] = KINDS

    def flags(self) -> dict[str, Any]:
        return {
            "needs_data": self.needs_data,
            "training_free": self.training_free,
            "changes_architecture": self.changes_architecture,
            "kinds": list(self.kinds),
        }


@dataclass(frozen=True)
class BoundDefense:
    """A registry entry with a validated config: a :class:`Defense`."""

    entry: DefenseEntry
    config: Any
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.entry.name)

    def apply(self, model: nn.Module, data: Any | None = None) -> Defended:
        if self.entry.needs_data and data is None:
            raise SpecdefError(
                f"Defense {self.name!r} trains on harmful and retain data; pass a DefenseData "
                "(specdef.defenses.data.load_defense_data)."
            )
        defended = self.entry.apply(model, self.config, data)
        defended.record = {
            "name": self.name,
            "config": config_dict(self.config),
            "flags": self.entry.flags(),
            "cites": self.entry.cites,
            "deviations": self.entry.deviations,
            **defended.record,
        }
        return defended


_DEFENSES: dict[str, DefenseEntry] = {}


def register_defense(entry: DefenseEntry, *, replace: bool = False) -> DefenseEntry:
    """Add ``entry`` to the registry (``replace`` to swap an entry of the same name)."""
    if not dataclasses.is_dataclass(entry.config):
        raise SpecdefError(f"Defense {entry.name!r}: config must be a dataclass type.")
    if entry.name in _DEFENSES and not replace:
        raise SpecdefError(f"Defense {entry.name!r} is already registered; pass replace=True.")
    unknown = set(entry.kinds) - set(KINDS)
    if unknown:
        raise SpecdefError(f"Defense {entry.name!r}: unknown kinds {sorted(unknown)}; use {KINDS}.")
    _DEFENSES[entry.name] = entry
    return entry


def defense_names() -> list[str]:
    return list(_DEFENSES)


def get_defense_entry(name: str) -> DefenseEntry:
    if name not in _DEFENSES:
        raise SpecdefError(did_you_mean(name, _DEFENSES, what="defense"))
    return _DEFENSES[name]


def config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-able data (tuples as lists)."""
    out = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def make_config(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """The config of defense ``name`` from plain data: unknown keys get did-you-mean, values are
    checked against the field types (a string from ``k=v`` is read as YAML first: ``1e-3``,
    ``true``, ``[a, b]``), lists become tuples; the dataclass then validates itself."""
    entry = get_defense_entry(name)
    fields = {f.name: f for f in dataclasses.fields(entry.config)}
    hints = typing.get_type_hints(entry.config)
    kwargs: dict[str, Any] = {}
    for key, raw in (values or {}).items():
        key = str(key).replace("-", "_")
        if key not in fields:
            raise SpecdefError(did_you_mean(key, fields, what=f"config key of defense {name!r}"))
        kwargs[key] = _coerce(raw, hints[key], where=f"{name}.{key}")
    try:
        return entry.config(**kwargs)
    except (TypeError, ValueError) as err:
        raise SpecdefError(f"Defense {name!r}: invalid config ({err}).") from None


def _coerce(raw: Any, hint: Any, *, where: str) -> Any:
    allowed = _allowed(hint)
    if isinstance(raw, str) and str in allowed:  # a string field keeps its text
        return None if raw.lower() in ("null", "none") and type(None) in allowed else raw
    value = load_yaml(raw, what=where) if isinstance(raw, str) else raw
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, list) and tuple in allowed:
        return tuple(value)
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int) and int not in allowed and float in allowed:
        value, ok = float(value), True
    else:
        ok = object in allowed or any(isinstance(value, t) for t in allowed)
    if not ok:
        names = ", ".join(sorted(t.__name__ for t in allowed))
        raise SpecdefError(f"{where}: expected {names}, found {value!r}.")
    return value


def _allowed(hint: Any) -> set[type]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_allowed(a) for a in typing.get_args(hint)))
    if hint is type(None):
        return {type(None)}
    if origin is tuple:
        return {tuple}
    if hint is typing.Any:
        return {object}
    return {origin or hint}


def make_defense(name: str, values: Mapping[str, Any] | None = None) -> BoundDefense:
    """Defense ``name`` with its config from ``values`` (see :func:`make_config`)."""
    return BoundDefense(get_defense_entry(name), make_config(name, values))


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["lr=1e-3", "steps=20"]`` (the CLI's ``--defense-config``) → ``{"lr": "1e-3", …}``; a
    single item naming a ``.yaml``/``.yml`` file is read as a mapping instead."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item and item.endswith((".yaml", ".yml")):
            out.update(_read_yaml_mapping(item))
            continue
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecdefError(
                f"--defense-config expects KEY=VALUE or a YAML file, found {item!r}; e.g. "
                "--defense-config steps=50 lr=1e-3."
            )
        out[key.strip()] = value
    return out


def _read_yaml_mapping(path: str) -> dict[str, Any]:
    target = Path(path)
    if not target.is_file():
        raise SpecdefError(f"Defense config file {path!r} does not exist.")
    data = load_yaml(target.read_text(encoding="utf-8"), what=path)
    if not isinstance(data, Mapping):
        raise SpecdefError(
            f"{path!r}: expected a mapping of config keys, found {type(data).__name__}."
        )
    return dict(data)
