"""The sweep's search space and objective in plain Python (no Ray): what `sweep.space` may hold, and how a
trial's clean accuracy (CA) and attack success rate (ASR) become the one scalar Tune maximises.

A space maps config keys to one distribution each, as YAML:

    unlearn.num_samples: {grid: [150, 300, 600]}      # every value, in every combination with the other grids
    unlearn.forget: {choice: [token_invariance, push_away]}
    unlearn.lr: {loguniform: [1.0e-5, 1.0e-3]}
    unlearn.forget_weight: {uniform: [1, 5]}
    unlearn.steps: {randint: [20, 101]}               # high excluded, as in Ray Tune

Only keys that the unlearning alone reads may vary (`unlearn.*`, `train.*`): every trial shares the scores, the
selection, the backdoored model and the evaluation.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from ..config import check_key, key_type
from ..errors import ConfigError, UserError

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEPT_SECTIONS = ("unlearn", "train")
# Keys of those sections that the sweep sets itself, and where to set them instead.
FIXED_KEYS = {"unlearn.output": "each trial writes under <sweep.output>/trials/<trial id>",
              "train.output": "each trial writes under <sweep.output>/trials/<trial id>",
              "train.num_workers": "set sweep.num_workers", "train.cpus_per_worker": "set sweep.cpus_per_worker",
              "train.use_gpu": "set sweep.use_gpu"}
OBJECTIVES = ("ca_subject_to_asr", "ca", "asr", "ca_minus_asr")
# Where a trial's row goes in the results, before the objective decides within each group.
STATUS_ORDER = ("finished", "stopped", "error")


@dataclass(frozen=True)
class Dimension:
    """One key of the space: its distribution and that distribution's values (grid, choice) or bounds."""
    key: str
    kind: str
    values: tuple

    @property
    def largest(self) -> Any:
        """The largest value a trial can draw."""
        if self.kind == "randint":
            return self.values[1] - 1
        return max(self.values)


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
            raise ConfigError(f"sweep.space names an {str(e).rstrip('.')} (`ubt config --keys` lists every "
                              f"key).") from None
        if section not in SWEPT_SECTIONS:
            raise ConfigError(f"{where} would change what every trial shares (scores, selection, model, data, "
                              f"evaluation): sweep only unlearn.* and train.* keys, and run one sweep per {key} "
                              f"value instead.")
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


def largest(dims: list[Dimension], key: str, default: Any) -> Any:
    """The largest value of `key` any trial can draw (`default` when the space does not vary it)."""
    return next((d.largest for d in dims if d.key == key), default)


def objective_value(clean_accuracy: float, attack_success_rate: float | None, kind: str, threshold: float) -> float:
    """The scalar Tune maximises. ca_subject_to_asr: CA when ASR <= threshold, else -ASR, so that every trial
    over the threshold ranks below every trial that meets it, and among them the lowest ASR ranks first."""
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective {kind!r}: use one of {', '.join(OBJECTIVES)}")
    if kind == "ca":
        return clean_accuracy
    if attack_success_rate is None:
        raise UserError(f"sweep.objective={kind} needs the attack success rate but no trigger is evaluated: "
                        f"point evaluate.trigger at the saved trigger, or use sweep.objective=ca.")
    if kind == "asr":
        return -attack_success_rate
    if kind == "ca_minus_asr":
        return clean_accuracy - attack_success_rate
    return clean_accuracy if attack_success_rate <= threshold else -attack_success_rate


def rank_rows(rows: list[dict]) -> list[dict]:
    """Trial rows best first: finished trials by objective, then those stopped early (by their last probe's
    objective), then failed ones; ties by trial id."""
    def key(row: dict) -> tuple:
        objective = row.get("objective")
        missing = objective is None or (isinstance(objective, float) and math.isnan(objective))
        return (STATUS_ORDER.index(row["status"]), missing, -(objective or 0.0) if not missing else 0.0,
                row["trial_id"])
    return sorted(rows, key=key)
