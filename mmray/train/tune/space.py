"""The search space of ``mmray tune``: dotted config keys, one distribution each, checked against the
config before any trial starts.

The space is a YAML mapping of dotted config keys to one distribution each::

    train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.fusion: {choice: [concat, gated]}
    model.dropout: {uniform: [0.0, 0.3]}
    train.batch_size: {randint: [16, 65]}   # high exclusive, as in ray.tune.randint

Every key is checked against the config up front: each choice, and both ends of each range, must give
a config the loader accepts, and so must the combinations of those extremes. A space that samples a
key preprocessing depends on (``PREPROCESS_KEYS``) makes every trial preprocess for itself.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmray.config import Config, ConfigError, config_from_dict, load_yaml, set_dotted

__all__ = [
    "DISTRIBUTIONS",
    "Dimension",
    "PREPROCESS_KEYS",
    "load_space",
    "needs_own_preprocessing",
    "parse_space",
    "validate_space",
    "with_values",
]

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
# Keys the sweep owns: each trial's Train run gets its own name under the sweep's directory.
RESERVED = {
    "train.name": "each trial's run is named after its trial id",
    "train.storage_path": "trials run under the sweep's directory",
}
# Sampling one of these keys (or a key under or above one) changes what preprocessing produces.
PREPROCESS_KEYS = (
    "data",
    "storage",
    "model.tasks",
    "model.text_encoder.kind",
    "model.text_encoder.name",
    "model.text_encoder.tokenizer",
    "train.resume_from",
)
MAX_CORNERS = 4096  # combinations of extreme values checked up front


@dataclass(frozen=True)
class Dimension:
    """One sampled key: ``kind`` is one of ``DISTRIBUTIONS``; ``args`` the choices, or ``(low, high)``."""

    key: str
    kind: str
    args: tuple

    def extremes(self) -> list[Any]:
        """Every value the loader must accept: each choice, or both ends of the range."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [low, high]

    def domain(self) -> Any:
        import ray.tune

        if self.kind == "choice":
            return ray.tune.choice(list(self.args))
        return getattr(ray.tune, self.kind)(*self.args)


def parse_space(data: Any, source: str = "space") -> list[Dimension]:
    """Dimensions from a mapping ``{dotted.key: {distribution: args}}``; errors name the key.

    Only the shape of each entry is checked here; ``validate_space`` checks the values against a config.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: expected a non-empty mapping of dotted config keys to distributions")
    dims = []
    for key, spec in data.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{source}: {key!r} is not a dotted config key")
        if key in RESERVED:
            raise ConfigError(f"{source}: {key}: cannot be sampled ({RESERVED[key]})")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(
                f"{source}: {key}: expected one of {{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}}, got {spec!r}"
            )
        kind, args = next(iter(spec.items()))
        dims.append(Dimension(key, kind, _parse_args(f"{source}: {key}: {kind}", kind, args)))
    return dims


def _parse_args(where: str, kind: str, args: Any) -> tuple:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: expected a non-empty list of values, got {args!r}")
        return tuple(args)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: expected [low, high], got {args!r}")
    if kind == "randint":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: expected two integers, got {args!r}")
        low, high = args
    else:
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            low, high = (float(a) for a in args if not isinstance(a, bool))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected two numbers, got {args!r}") from None
    if not low < high:
        raise ConfigError(f"{where}: low must be < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: low must be > 0, got {args!r}")
    return (low, high)


def load_space(path: str | Path) -> list[Dimension]:
    return parse_space(load_yaml(path), str(path))


def with_values(base: dict, values: dict[str, Any]) -> Config:
    """The config ``base`` (a ``config_to_dict`` mapping) with each dotted key set to its value."""
    data = json.loads(json.dumps(base))  # a deep copy of plain data
    for key, value in values.items():
        set_dotted(data, key, value)
    return config_from_dict(data)


def validate_space(base: dict, dims: list[Dimension]) -> list[Config]:
    """Checks every key's extreme values, then their combinations; returns the configs checked.

    Raises:
        ConfigError: naming the sampled key (and, for a combination, every key's value).
    """
    for dim in dims:
        for value in dim.extremes():
            try:
                with_values(base, {dim.key: value})
            except ConfigError as e:
                raise ConfigError(f"space {dim.key}: value {value!r} is rejected by the config: {e}") from None
    corners = list(itertools.islice(itertools.product(*(d.extremes() for d in dims)), MAX_CORNERS))
    configs = []
    for corner in corners:
        values = dict(zip((d.key for d in dims), corner))
        try:
            configs.append(with_values(base, values))
        except ConfigError as e:
            raise ConfigError(f"space: the combination {values} is rejected by the config: {e}") from None
    return configs


def needs_own_preprocessing(dims: list[Dimension]) -> bool:
    """Whether a sampled key changes what preprocessing produces (then every trial preprocesses)."""
    return any(
        d.key == p or d.key.startswith(p + ".") or p.startswith(d.key + ".") for d in dims for p in PREPROCESS_KEYS
    )
