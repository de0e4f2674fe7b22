"""What `sweep.space` may hold, checked against the config's keys: one distribution of core.search.KINDS per key,
its values checked as the config checks that key's values.

A space maps config keys to one distribution each, as YAML:

    unlearn.num_samples: {grid: [150, 300, 600]}      # every value, in every combination with the other grids
    unlearn.forget: {choice: [token_invariance, push_away]}
    unlearn.lr: {loguniform: [1.0e-5, 1.0e-3]}
    unlearn.forget_weight: {uniform: [1, 5]}
    unlearn.steps: {randint: [20, 101]}               # high excluded, as in Ray Tune

Only keys that the unlearning alone reads may vary (`unlearn.*`, and `trainer.*`, its Ray Train run): every
trial shares the scores, the selection, the backdoored model and the evaluation.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from .config import check_key, key_type
from .core.search import KINDS, Dimension
from .errors import ConfigError

SWEPT_SECTIONS = ("unlearn", "trainer")
# Keys of those sections that the sweep sets itself, and where to set them instead.
FIXED_KEYS = {"unlearn.output": "each trial writes under <sweep.output>/trials/<trial id>",
              "trainer.num_workers": "set sweep.num_workers", "trainer.cpus_per_worker": "set sweep.cpus_per_worker",
              "trainer.use_gpu": "set sweep.use_gpu"}


def _is_integer_key(key: str) -> bool:
    hint = key_type(key)
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return int in args and float not in args


def parse_space(space: dict) -> list[Dimension]:
    """The dimensions of `sweep.space`, every key and value checked against the config: a mistake is one
    sentence that names the key and the fix."""
    if not space:
        raise ConfigError("sweep.space is empty: give at least one key, e.g. unlearn.num_samples: {grid: [150, 300]}.")
    dims = []
    for key, spec in space.items():
        where = f"sweep.space key '{key}'"
        section = str(key).partition(".")[0]
        try:
            key_type(str(key))
        except ConfigError as e:
            raise ConfigError(f"sweep.space names an {str(e).rstrip('.')} (`ubt config --keys --all` "
                              f"lists every key).") from None
        if section not in SWEPT_SECTIONS:
            raise ConfigError(f"{where} is not a setting of the unlearning, and every trial shares the rest (scores, "
                              f"selection, model, data, evaluation): sweep only unlearn.* and trainer.* keys, and run "
                              f"one sweep per {key} value instead.")
        if key in FIXED_KEYS:
            raise ConfigError(f"{where} is set by the sweep itself: {FIXED_KEYS[key]}.")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where} must map to one of {', '.join(KINDS)}, e.g. {{grid: [a, b]}} or "
                              f"{{uniform: [low, high]}}; got {spec!r}.")
        kind, values = next(iter(spec.items()))
        dims.append(Dimension(key, kind, _parse_values(key, kind, values)))
    return dims


def _parse_values(key: str, kind: str, values: Any) -> tuple:
    where = f"sweep.space key '{key}'"
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, e.g. {{{kind}: [a, b]}}; got {values!r}.")
    if kind in ("grid", "choice"):
        return tuple(check_key(key, v) for v in values)
    if len(values) != 2:
        raise ConfigError(f"{where}: {kind} needs [low, high]; got {values!r}.")
    integer = _is_integer_key(key)
    if kind in ("uniform", "loguniform") and integer:
        raise ConfigError(f"{where} takes integers: draw it with grid, choice or randint, not {kind}.")
    if kind == "randint" and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: randint needs integer bounds [low, high]; got {values!r}.")
    low, high = (check_key(key, v) for v in (values[0], values[1] - 1 if kind == "randint" else values[1]))
    if kind == "randint":
        high += 1
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high; got {values!r}.")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0; got {values!r}.")
    return (low, high)
