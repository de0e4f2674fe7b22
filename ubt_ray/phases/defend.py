"""defend: UBT end to end on a possibly backdoored checkpoint and its suspicious shards (METHOD.md steps 1-5).

overfit -> score -> select -> unlearn, with CA and ASR of θ₀ and of the cleaned model, and a report
(`report.json`, `report.md`) of the detection metrics, rows, wall time and cost of every phase: each phase's
`cost` is its manifest's (cost.py), the one account of its work; the report's `cost` is their sum (the defense
alone; the defend manifest's adds the evaluations before and after, from their results).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .. import console, storage
from ..checks import check_score
from ..config import Config
from ..core.models import CHECKPOINT_SUFFIXES
from ..cost import sum_costs, summed
from ..errors import UserError
from ..manifest import finished_output, fingerprint, write_manifest
from ..report import format_report
from ..train_loop import FitResult
from .evaluate import evaluate_to, evaluation_files
from .overfit import overfit
from .score import ScoreResult, score
from .select import select
from .unlearn import unlearn

REPORT_JSON, REPORT_MD = "report.json", "report.md"
DEFENSE_PHASES = ("overfit", "score", "select", "unlearn")


@dataclass
class DefendResult:
    model: str
    report: dict
    output: str


@console.phase("defend", lambda cfg: f"UBT on {cfg.defend.model} with {cfg.defend.data}",
               lambda r: f"cleaned model {r.model}" + (" (reused)" if r.report.get("reused") else ""))
def defend(cfg: Config) -> DefendResult:
    """Run UBT on `defend.model` and `defend.data`; the cleaned model goes to <unlearn.output>/model.

    With `pipeline.reuse`, a finished defense in `defend.output` of the same model files, data files and
    settings is returned as it is (its report gains `"reused": true`) instead of being run again.
    """
    d = cfg.defend
    check_score(cfg.score)  # before any phase runs, not after the first ones
    if not storage.exists(d.model, cfg.storage):
        raise UserError(f"defend.model={d.model} does not exist: train the backdoored model first "
                        f"(`ubt train`) or point defend.model at an open_clip local-dir checkpoint.")
    signature = defense_fingerprint(cfg)
    earlier = (finished_output(d.output, signature, cfg, REPORT_JSON, needs=("cleaned_model",))
               if cfg.pipeline.reuse else None)
    if earlier is not None:
        return DefendResult(earlier["cleaned_model"], {**earlier, "reused": True}, d.output)
    started = time.time()
    storage.claim_output(d.output, "defend", cfg.storage)
    before = evaluate_to(cfg, d.model, storage.join(d.output, "eval_before")) if d.evaluate else None

    s, phases = find_suspicious(cfg)
    sel = select(cfg, cfg.score.output, d.data, k=cfg.unlearn.num_samples)
    phases["select"] = {"wall_time_s": sel.wall_time_s, "rows": sel.stats["scored_rows"],
                        "num_forget": sel.num_forget, "num_retain": sel.num_retain, "cost": sel.manifest["cost"]}
    u = unlearn(cfg, d.model, sel.forget, sel.retain)
    phases["unlearn"] = training_phase(cfg, u)
    after = evaluate_to(cfg, u.model, storage.join(d.output, "eval_after")) if d.evaluate else None
    cost = sum_costs(p["cost"] for p in phases.values())

    report = {
        "run": cfg.run.name, "model": d.model, "data": d.data, "cleaned_model": u.model,
        "before": _metrics(before), "after": _metrics(after),
        "detection": s.detection, "selection": sel.stats, "phases": phases,
        "defense_wall_time_s": round(sum(p["wall_time_s"] for p in phases.values()), 1),
        "cost": cost,
        "settings": {"score": dataclasses.asdict(cfg.score), "unlearn": dataclasses.asdict(cfg.unlearn),
                     "overfit": dataclasses.asdict(cfg.overfit) if "overfit" in phases else None,
                     "select": dataclasses.asdict(cfg.select)},
        "fingerprint": signature,
    }
    storage.write_json(storage.join(d.output, REPORT_JSON), report, cfg.storage)
    storage.write_bytes(storage.join(d.output, REPORT_MD), format_report(report).encode(), cfg.storage)
    evaluations = [e.manifest["cost"] for e in (before, after) if e is not None]
    write_manifest(d.output, "defend", cfg, inputs={"model": d.model, "data": d.data}, rows=None, started=started,
                   usage=summed([cost, *evaluations]), extra={"cleaned_model": u.model, "report": storage.join(d.output, REPORT_JSON)})
    return DefendResult(u.model, report, d.output)


def find_suspicious(cfg: Config, output: str | None = None) -> tuple[ScoreResult, dict[str, dict]]:
    """METHOD.md steps 1-2 on `defend.model` and `defend.data`: overfit (when configured) and score, the table
    going to <output or score.output>/table; returns the score result and each phase's rows and wall time."""
    d = cfg.defend
    phases: dict[str, dict] = {}
    scoring_model = d.model
    if d.overfit:
        r = overfit(cfg, d.model, d.data)
        scoring_model = r.model
        phases["overfit"] = training_phase(cfg, r)
    s = score(cfg, scoring_model, d.data, output, k=cfg.unlearn.num_samples)
    phases["score"] = {"wall_time_s": s.wall_time_s, "rows": s.rows.rows_in, "rows_rejected": s.rows.rows_rejected,
                       "model": scoring_model, "table": s.table, "actors": s.manifest["actors"],
                       "cost": s.manifest["cost"]}
    return s, phases


def training_phase(cfg: Config, r: FitResult) -> dict:
    """A training phase's entry in the report: its rows, steps, the samples its loop drew (steps x batch size),
    its Ray Train workers and its manifest's cost."""
    return {"wall_time_s": r.wall_time_s, "rows": r.rows, "steps": r.steps, "samples": r.samples, "model": r.model,
            "workers": max(1, cfg.trainer.num_workers), "cost": r.manifest["cost"]}


def defense_fingerprint(cfg: Config) -> dict:
    """What makes two defenses the same: the config sections they read, the seed, and the signatures (path,
    size, mtime) of the model, data, test and trigger files."""
    d = cfg.defend
    return fingerprint(cfg, ("defend", "overfit", "score", "select", "unlearn", "evaluate", "model", "data"), {
        "model_files": (d.model, CHECKPOINT_SUFFIXES), "data_files": (d.data, (".parquet",)),
        **evaluation_files(cfg, d.evaluate)})


def _metrics(result) -> dict | None:
    if result is None:
        return None
    return {"clean_accuracy": result.clean_accuracy, "clean_accuracy_heldout": result.clean_accuracy_heldout,
            "attack_success_rate": result.attack_success_rate,
            "clean_target_rate": result.metrics.get("clean_target_rate")}


