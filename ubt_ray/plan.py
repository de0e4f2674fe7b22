"""`ubt plan`: the time and cost of a finished defense's phases at another size and on another cluster, from
the throughput each phase measured (its report.json's rows, wall time and `cost` block, cost.py).

The arithmetic is plain and its assumptions are printed with every plan (`assumptions`):
- score: linear in rows and in actors: the measured rows per second per actor, times the actors. Its wall
  time includes start-up and model loading, so from a small run the estimate is on the high side.
- select: its passes over the score table and the shards are linear in rows, spread over the cluster's CPUs;
  what it holds on the driver is bounded by k and the retain set.
- overfit and unlearn: a fixed number of optimiser steps (overfit.steps, unlearn.steps) of a fixed batch,
  whatever the rows; their step time falls in proportion to the workers (ideal data parallelism at a fixed
  global batch, no communication cost).
- A rate is per device of the kind the run reserved: from a CPU run, a GPU plan is not an estimate of a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .console import duration
from .errors import UserError

SCALED = ("score", "select")  # phases whose work grows with the rows
FIXED = ("overfit", "unlearn")  # a fixed number of training steps


@dataclass(frozen=True)
class Cluster:
    """The cluster to plan for: scoring actors, training workers, CPUs for select's tasks, whether each actor
    and worker holds a GPU."""
    actors: int
    workers: int
    cpus: float
    gpu: bool


@dataclass
class Estimate:
    """One phase at the planned size and cluster."""
    phase: str
    rows: int             # the rows it goes through: all of them (score, select), else the run's samples
    time_s: float
    forward: int
    backward: int
    cpu_hours: float
    gpu_hours: float
    rule: str


def measured_cluster(report: dict) -> Cluster:
    """The cluster the defense in `report` ran on, as its phases reserved it."""
    phases = _phases(report)
    score = phases["score"]
    training = [phases[p] for p in FIXED if p in phases]
    gpu = any(p["cost"]["reserved_gpus"] for p in (score, *training))
    cpus = phases["select"]["cost"]["reserved_cpus"] if "select" in phases else score["cost"]["reserved_cpus"]
    return Cluster(actors=int(score.get("actors") or 1), workers=int(training[0].get("workers") or 1) if training
                   else 1, cpus=float(cpus) or 1.0, gpu=bool(gpu))


def _phases(report: dict) -> dict:
    phases = report.get("phases") or {}
    if "score" not in phases:
        raise UserError("the report has no score phase: plan from the report.json of a finished `ubt defend`.")
    missing = [name for name, p in phases.items() if not p.get("cost")]
    if missing:
        raise UserError(f"the report's {', '.join(missing)} phase{'s have' if len(missing) > 1 else ' has'} no cost: "
                        f"it was written before costs were recorded; run `ubt defend` again "
                        f"(experimental.pipeline.reuse=false) to measure them.")
    return phases


def estimate(report: dict, rows: int, cluster: Cluster) -> list[Estimate]:
    """Each defense phase of `report` at `rows` rows on `cluster`, by the rules in the module's docstring."""
    if rows < 1:
        raise UserError(f"--rows {rows}: plan for at least one row.")
    if cluster.actors < 1 or cluster.workers < 1 or cluster.cpus <= 0:
        raise UserError("plan for at least one scoring actor, one training worker and one CPU.")
    phases = _phases(report)
    before = measured_cluster(report)
    out = []
    for name, p in phases.items():
        c = p["cost"]
        wall = float(c["wall_time_s"])
        if name in SCALED:
            measured_rows = int(p.get("rows") or 0)
            if measured_rows < 1:
                raise UserError(f"the report's {name} phase measured no rows: nothing to scale from.")
            ratio = rows / measured_rows
            units, planned = ((before.actors, cluster.actors) if name == "score" else (before.cpus, cluster.cpus))
            time_s = wall * ratio * units / planned
            forward, backward = round(c["forward_sample_passes"] * ratio), round(c["backward_sample_passes"] * ratio)
            unit = "actor" if name == "score" else "CPU"
            rule = (f"{measured_rows / wall / units:,.1f} rows/s per {unit} measured ({measured_rows:,} rows in "
                    f"{wall:,.1f} s on {units:g} {unit}s), x {planned:g} {unit}s")
            scale = planned / units  # the reservation grows with the actors (score) or is the cluster (select)
        else:
            units, planned = before.workers, cluster.workers
            time_s = wall * units / planned
            forward, backward = int(c["forward_sample_passes"]), int(c["backward_sample_passes"])
            steps = p.get("steps")
            rule = (f"{steps} steps, fixed: {wall / max(1, steps or 1):,.2f} s/step measured on {units} "
                    f"worker{'s' if units != 1 else ''}, / {planned} worker{'s' if planned != 1 else ''}")
            scale = planned / units
        cpus, gpus = float(c["reserved_cpus"]) * scale, float(c["reserved_gpus"]) * scale
        if cluster.gpu and not before.gpu:  # each actor and worker planned on one GPU
            gpus = planned if name in ("score", *FIXED) else 0.0
        out.append(Estimate(name, rows if name in SCALED else int(p.get("samples") or forward), time_s, forward,
                            backward, cpus * time_s / 3600, gpus * time_s / 3600, rule))
    return out


def assumptions(report: dict, rows: int, cluster: Cluster) -> list[str]:
    """The plan's assumptions, with what the defense's settings say about the fixed phases."""
    before = measured_cluster(report)
    settings = report.get("settings") or {}
    overfit, unlearn, select = (settings.get(k) or {} for k in ("overfit", "unlearn", "select"))
    phases = _phases(report)
    lines = [f"measured: {phases['score'].get('rows', 0):,} rows on {before.actors} scoring actor(s), "
             f"{before.workers} training worker(s), {before.cpus:g} CPUs for select"
             f"{', GPUs' if before.gpu else ', no GPU'}; planned: {rows:,} rows on {cluster.actors} actor(s), "
             f"{cluster.workers} worker(s), {cluster.cpus:g} CPUs{', one GPU per actor and worker' if cluster.gpu else ''}.",
             "score: linear in rows and actors (measured rows/s per actor x actors); the data read once per "
             "scoring pass; its measured time includes start-up and model loading, so a plan from a small run is "
             "on the high side.",
             "select: linear in rows over the cluster's CPUs (a pass over the score table, one over the shards); "
             "its driver memory is bounded by k and the retain set."]
    if "overfit" in phases:
        lines.append(f"overfit: overfit.steps={overfit.get('steps')} steps of {overfit.get('batch_size')} rows, "
                     f"whatever the rows (the config fixes them); step time / workers (ideal data parallelism)"
                     + (f"; its subset (subset_fraction={overfit.get('subset_fraction')}, "
                        f"{overfit.get('prioritize')}) is read or scored from D, taken as fixed here"
                        if (overfit.get("subset_fraction") or 1) < 1 else "") + ".")
    if "unlearn" in phases:
        lines.append(f"unlearn: unlearn.steps={unlearn.get('steps')} steps of {unlearn.get('batch_size')} retain "
                     f"rows, a retain set of select.retain_samples={select.get('retain_samples')} rows and "
                     f"k=unlearn.num_samples={unlearn.get('num_samples')} forget rows, whatever the rows (set k "
                     f"for the poisons expected at {rows:,} rows: the steps do not change with it); step time / "
                     f"workers.")
    if cluster.gpu != before.gpu:
        lines.append(f"WARNING: the defense was measured on {'GPUs' if before.gpu else 'CPUs'} and the plan is for "
                     f"{'GPUs' if cluster.gpu else 'CPUs'}: its rates are per {'GPU' if before.gpu else 'CPU'} "
                     f"actor and worker, so these times are not an estimate for the planned devices; measure a "
                     f"defense on one of them first.")
    lines.append("not included: the evaluations (CA and ASR), preparing and writing the shards, the cluster's "
                 "start-up; reserved hours are reservations x time.")
    return lines


def plan_table(estimates: list[Estimate], gpu_hour_price: float | None = None,
               cpu_hour_price: float | None = None) -> str:
    """The estimates as a Markdown table with a total row (and a cost column when a price is given)."""
    priced = gpu_hour_price is not None or cpu_hour_price is not None

    def price(e_cpu: float, e_gpu: float) -> str:
        return f" {e_cpu * (cpu_hour_price or 0) + e_gpu * (gpu_hour_price or 0):,.2f} |" if priced else ""

    lines = ["| phase | rows (training: samples, fixed) | time | forward passes | backward passes | reserved CPU-hours | reserved GPU-hours |"
             + (" cost |" if priced else ""), "|---|---|---|---|---|---|---|" + ("---|" if priced else "")]
    for e in estimates:
        lines.append(f"| {e.phase} | {e.rows:,} | {duration(e.time_s)} | {e.forward:,} | {e.backward:,} | "
                     f"{e.cpu_hours:,.2f} | {e.gpu_hours:,.2f} |" + price(e.cpu_hours, e.gpu_hours))
    cpu_h, gpu_h = sum(e.cpu_hours for e in estimates), sum(e.gpu_hours for e in estimates)
    lines.append(f"| **total** | | **{duration(sum(e.time_s for e in estimates))}** | "
                 f"{sum(e.forward for e in estimates):,} | {sum(e.backward for e in estimates):,} | {cpu_h:,.2f} | "
                 f"{gpu_h:,.2f} |" + price(cpu_h, gpu_h))
    return "\n".join(lines)


def planned_cluster(report: dict, actors: int | None, workers: int | None, gpus: int | None,
                    cpus: float | None) -> Cluster:
    """The cluster of `ubt plan`'s options, the measured one where an option is not given: `gpus` gives each
    actor and worker a GPU (actors = workers = gpus unless given); `cpus` sets select's CPUs and, without
    `actors` or `gpus`, the CPU actors as score's default does (one per CPU where the measured actors reserved
    less than a CPU each, the default; else one per measured reservation, one CPU left)."""
    before = measured_cluster(report)
    for name, value in (("--actors", actors), ("--workers", workers), ("--gpus", gpus), ("--cpus", cpus)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value:g}: give at least 1.")
    if gpus is not None:
        return Cluster(actors or gpus, workers or gpus, cpus or before.cpus, True)
    per_actor = _phases(report)["score"]["cost"]["reserved_cpus"] / max(1, before.actors)
    cpu_actors = before.actors
    if cpus is not None:
        cpu_actors = max(1, math.floor(cpus) if per_actor < 1 else math.floor((cpus - 1) / per_actor))
    return Cluster(actors or cpu_actors, workers or before.workers, cpus or before.cpus, before.gpu)
