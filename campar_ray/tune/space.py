"""The search space: a YAML file of config keys and distributions, checked before any trial.

Each entry names a dotted config key and one distribution (``cfar.alpha: {loguniform:
[0.5, 100]}``). Everything is checked up front, so a typo fails in a second with a message
naming the entry instead of after an hour of trials: the key must be a tunable config key,
the distribution one of :data:`DISTRIBUTIONS` and suited to the key's type, the bounds ordered
(and positive for log scales), and every bound or choice a value the config accepts.

The space is expressed as Optuna distributions: the searcher samples from them and the
parameter-importance evaluator reads the finished trials against them, so the two cannot
disagree. Choices Optuna cannot store (lists such as ``data.image_size``) travel as their
YAML text and are decoded back when a trial builds its config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna.distributions as od
import yaml

from campar_ray import storage
from campar_ray.bounded import BoundedError, load_yaml
from campar_ray.cfar.fit import check_cfar_config
from campar_ray.config import TUNE_SCOPES, Config, ConfigError, config_keys

SCOPES = TUNE_SCOPES
DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")
STAGE2_PREFIX = "cfar."
FIXED_KEYS = (
    "run.dir",
    "data.manifest",
    "seed",
    "train.epochs",
    "train.num_workers",
    "train.use_gpu",
    "train.cpus_per_worker",
    "train.keep_checkpoints",
    "train.max_failures",
    "train.resize_check_seconds",
    "train.checkpoint_every_minutes",
    "data.decode_concurrency",
    "data.prefetch_batches",
    "data.decode_cpus",
    "data.starvation_threshold",
    "cfar.solver",
    "cfar.actors",
    "tracking.tensorboard",
    "tracking.mlflow_uri",
    "tracking.experiment",
)
"""Where data lives, resources, the seed, the epoch budget (ASHA's ``max_t``), fault tolerance
and tracking: settings of the search, not hyperparameters of the model."""

DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "search_space.yaml"
"""Shipped as package data next to the package's modules."""


class SearchSpaceError(ConfigError):
    """A search-space entry that cannot be searched (the message names the entry)."""


def tunable_keys() -> list[str]:
    return [key for key in config_keys() if key not in FIXED_KEYS]


@dataclass(frozen=True)
class Param:
    """One searched config key: its distribution and, for choices, the typed values."""

    key: str
    kind: str
    args: tuple[Any, ...]
    """``(low, high)`` for ranges, the choices (typed as the config holds them) otherwise."""

    def distribution(self) -> od.BaseDistribution:
        if self.kind == "choice":
            return od.CategoricalDistribution([_label(value) for value in self.args])
        low, high = self.args
        log = self.kind.startswith("log")
        if self.kind in ("int", "logint"):
            return od.IntDistribution(low, high, log=log)
        return od.FloatDistribution(low, high, log=log)

    def decode(self, sampled: Any) -> Any:
        """The config value of a sampled value (choices come back as their labels)."""
        if self.kind != "choice":
            return sampled
        return self.args[[_label(value) for value in self.args].index(sampled)]

    def encode(self, value: Any) -> Any | None:
        """The sampled form of a config value, or None when the value lies outside the space."""
        if self.kind == "choice":
            return _label(value) if value in self.args else None
        low, high = self.args
        return value if low <= value <= high else None

    def contains(self, sampled: Any) -> bool:
        """Whether ``sampled`` (in sampled form, e.g. read from JSON) is a value of the space."""
        if self.kind == "choice":
            labels = [_label(value) for value in self.args]
            return any(type(sampled) is type(label) and sampled == label for label in labels)
        integer = self.kind in ("int", "logint")
        low, high = self.args
        return (
            _is_number(sampled, integer)
            and low <= sampled <= high
            and (not integer or isinstance(sampled, int))
        )


@dataclass(frozen=True)
class SearchSpace:
    """The parameters one search samples, in file order."""

    params: tuple[Param, ...]
    skipped: tuple[str, ...] = ()
    """Entries of the file this scope does not search (stage-1 keys in scope ``cfar``)."""

    @property
    def keys(self) -> list[str]:
        return [param.key for param in self.params]

    def distributions(self) -> dict[str, od.BaseDistribution]:
        return {param.key: param.distribution() for param in self.params}

    def apply(self, base: Config, sampled: dict[str, Any]) -> Config:
        """``base`` with one trial's sampled values (keys outside the space are ignored)."""
        return base.override({param.key: param.decode(sampled[param.key]) for param in self.params})

    def start_point(self, base: Config) -> dict[str, Any] | None:
        """``base``'s own values in sampled form when all of them lie in the space, else None.

        Evaluated as the first trial, it makes the search's best at least as good as the
        configuration it started from (on validation data).
        """
        point = {param.key: param.encode(_value(base, param.key)) for param in self.params}
        return None if any(value is None for value in point.values()) else point


def load_search_space(path: str | None, base: Config, scope: str) -> SearchSpace:
    """Read and check a search-space YAML (the packaged default when ``path`` is None)."""
    if scope not in SCOPES:
        raise SearchSpaceError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    source = path or str(DEFAULT_SPACE)
    if path and not storage.exists(path):
        raise SearchSpaceError(f"search space file not found: {path}")
    text = storage.read_bytes(path).decode() if path else DEFAULT_SPACE.read_text()
    try:
        entries = load_yaml(text, f"search space {source}") or {}
    except BoundedError as error:
        raise SearchSpaceError(str(error)) from None
    if not isinstance(entries, dict) or not entries:
        raise SearchSpaceError(
            f"search space {source} must map config keys to distributions, "
            "e.g. 'cfar.alpha: {loguniform: [0.5, 100]}'"
        )
    params = [parse_entry(str(key), spec, base) for key, spec in entries.items()]
    searched = [p for p in params if scope == "full" or p.key.startswith(STAGE2_PREFIX)]
    if not searched:
        raise SearchSpaceError(
            f"search space {source} has no {STAGE2_PREFIX}* entries; scope 'cfar' searches "
            "stage 2 only (use scope 'full' to search stage-1 keys)"
        )
    skipped = tuple(p.key for p in params if p not in searched)
    return SearchSpace(tuple(searched), skipped)


def parse_entry(key: str, spec: Any, base: Config) -> Param:
    """One ``key: {distribution: args}`` entry, checked against the key's type and limits."""
    if key not in tunable_keys():
        reason = "is not searchable" if key in FIXED_KEYS else "is not a config key"
        raise SearchSpaceError(
            f"search space entry {key!r} {reason}; searchable keys: {', '.join(tunable_keys())}"
        )
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SearchSpaceError(
            f"search space entry {key!r} must be one mapping {{distribution: arguments}}, "
            f"got {spec!r}; distributions: {', '.join(DISTRIBUTIONS)}"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SearchSpaceError(
            f"search space entry {key!r}: unknown distribution {kind!r}; "
            f"valid: {', '.join(DISTRIBUTIONS)}"
        )
    if not isinstance(args, list) or not args:
        raise SearchSpaceError(
            f"search space entry {key!r}: {kind} needs a non-empty list, got {args!r}"
        )
    if kind == "choice":
        values = tuple(_checked(key, value, base) for value in args)
        if len(set(map(_label, values))) != len(values):
            raise SearchSpaceError(f"search space entry {key!r}: repeated choice in {args}")
        return Param(key, kind, values)
    return Param(key, kind, _bounds(key, kind, args, base))


def _bounds(key: str, kind: str, args: list[Any], base: Config) -> tuple[Any, Any]:
    current = _value(base, key)
    integer = kind in ("int", "logint")
    fitting = _range_kinds(current)
    if kind not in fitting:
        valid = ", ".join((*fitting, "choice"))
        raise SearchSpaceError(
            f"search space entry {key!r}: {kind} does not suit {type(current).__name__} "
            f"values; use {valid}"
        )
    numbers = [_number(value) for value in args]
    wanted = int if integer else float
    if len(args) != 2 or not all(_is_number(value, integer) for value in numbers):
        raise SearchSpaceError(
            f"search space entry {key!r}: {kind} needs [low, high] as two "
            f"{wanted.__name__}s, got {args}"
        )
    low, high = (wanted(_checked(key, value, base)) for value in numbers)
    if not low < high:
        raise SearchSpaceError(f"search space entry {key!r}: low {low} must be below high {high}")
    if kind.startswith("log") and low <= 0:
        raise SearchSpaceError(
            f"search space entry {key!r}: {kind} needs low > 0, got {low} (use "
            f"{'int' if integer else 'uniform'} for ranges that reach 0)"
        )
    return low, high


def _range_kinds(current: Any) -> tuple[str, ...]:
    """Range distributions a key of this value's type takes (any key takes ``choice``)."""
    if isinstance(current, bool):
        return ()
    if isinstance(current, int):
        return ("int", "logint")
    if isinstance(current, float):
        return ("uniform", "loguniform")
    return ()


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as text; take it as the number it was meant to be."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _checked(key: str, value: Any, base: Config) -> Any:
    """``value`` as the config holds it, refused when the config (or stage 2) would refuse it."""
    try:
        config = base.override({key: value})
        if key.startswith(STAGE2_PREFIX):
            check_cfar_config(config.cfar)
    except ConfigError as error:
        raise SearchSpaceError(f"search space entry {key!r}: {error}") from None
    return _value(config, key)


def _value(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _is_number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return float(value).is_integer() if integer else math.isfinite(value)


def _label(value: Any) -> Any:
    """Optuna stores only None, bool, int, float and str; anything else goes as YAML text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    plain = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(plain, default_flow_style=True).strip()
