"""The sweep's search space and objective in plain Python (no Ray): the distributions a space's key may draw from,
and how a trial's clean accuracy (CA) and attack success rate (ASR) become the one scalar Tune maximises. Parsing
`sweep.space` against the config's keys is the program's (ubt_ray.sweep_space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import UserError

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
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
        raise UserError(f"experimental.sweep.objective={kind} needs the attack success rate but no trigger is evaluated: "
                        f"point evaluate.trigger at the saved trigger, or use experimental.sweep.objective=ca.")
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
