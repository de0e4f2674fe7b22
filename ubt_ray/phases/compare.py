"""compare: no defense / fine-tuning / CleanCLIP / UBT on the same backdoored models, one table per attack.

For every attack config in `compare.attacks` (each with `compare.layers` layered over it, then
`compare.overrides` and the command line's overrides applied): the backdoored model is made if it is missing
(prepare, poison, train: reused when done), then each defense of `compare.defenses` runs on it and is
evaluated with the same evaluation (a finished one of the same model, data and settings is reused, with
`pipeline.reuse`). Written to `compare.output`: comparison.md and comparison.csv (one row per
attack and defense) and comparison.png (CA and ASR per defense, grouped by attack).

Columns: CA, ASR, clean samples (the trusted clean pairs a baseline's training drew: optimiser steps x batch
size; UBT needs none), wall time, and the defense's cost (cost.py, from its phases' manifests, the one account of
its work; the evaluations not included): forward and backward image-tower sample-passes (UBT's all over the
suspicious set D), and reserved CPU- and GPU-seconds (reservation x wall time, summed over its phases).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .. import console, storage
from ..checks import check_compare
from ..config import Config, load_config
from ..cost import empty_cost, summed
from ..manifest import write_manifest
from ..report import LABELS, comparison_markdown, comparison_png, percent, write_report_files
from .baseline import baseline
from .defend import defend
from .evaluate import evaluate_to

COLUMNS = ("attack", "defense", "clean_accuracy", "clean_accuracy_heldout", "attack_success_rate", "clean_samples",
           "wall_time_s", "forward_passes", "backward_passes", "reserved_cpu_s", "reserved_gpu_s")


@dataclass
class CompareResult:
    rows: list[dict]
    output: str


def compare(cfg: Config, overrides: list[str] | None = None) -> CompareResult:
    """Run `compare.defenses` on every attack of `compare.attacks`; tables and chart go to `compare.output`."""
    c = cfg.compare
    check_compare(c)
    started = time.time()
    storage.claim_output(c.output, "compare", cfg.storage)
    rows = []
    for path in c.attacks:
        attack_cfg = load_config([path, *c.layers], list(c.overrides) + list(overrides or []))
        rows += compare_attack(attack_cfg, list(c.defenses), c.output)
    write_comparison(rows, c.output, cfg)
    write_manifest(c.output, "compare", cfg, inputs={"attacks": list(c.attacks)}, rows=None, started=started,
                   usage=summed(r["cost"] for r in rows), extra={"defenses": list(c.defenses)})
    return CompareResult(rows, c.output)


def compare_attack(cfg: Config, defenses: list[str], output: str) -> list[dict]:
    """Every defense on one attack's backdoored model (made first when missing); the undefended model's
    evaluation goes to <output>/<run.name>/none."""
    _ensure_backdoored(cfg)
    name = cfg.run.name
    out = []
    for d in defenses:
        started = time.time()
        if d == "none":
            ev = evaluate_to(cfg, cfg.defend.model, storage.join(output, name, "none"))
            ca, asr, clean, wall = ev.clean_accuracy, ev.attack_success_rate, 0, 0.0
            ca_heldout = ev.clean_accuracy_heldout
            cost = empty_cost()
        elif d == "ubt":
            r = defend(dataclasses.replace(cfg, defend=dataclasses.replace(cfg.defend, evaluate=True)))
            ca, asr = r.report["after"]["clean_accuracy"], r.report["after"]["attack_success_rate"]
            ca_heldout = r.report["after"].get("clean_accuracy_heldout")
            clean, wall = 0, r.report["defense_wall_time_s"]
            cost = r.report.get("cost") or empty_cost()  # a report written before costs were recorded: none
            if r.report.get("reused"):
                console.log.info(f"[compare] {name} UBT: reused the finished defense in {r.output}")
        else:
            r = baseline(cfg, d, cfg.defend.model)
            ca, asr = r.evaluation.clean_accuracy, r.evaluation.attack_success_rate
            ca_heldout = r.evaluation.clean_accuracy_heldout
            clean, wall = r.clean_samples, r.fit.wall_time_s
            cost = r.fit.manifest.get("cost") or empty_cost()
            if r.reused:
                console.log.info(f"[compare] {name} {LABELS[d]}: reused the finished baseline in "
                                 f"{cfg.baseline.output}/{d}")
        out.append({"attack": name, "defense": d, "clean_accuracy": ca, "clean_accuracy_heldout": ca_heldout,
                    "attack_success_rate": asr,
                    "clean_samples": clean, "wall_time_s": round(wall, 1),
                    "forward_passes": cost["forward_sample_passes"], "backward_passes": cost["backward_sample_passes"],
                    "reserved_cpu_s": cost["reserved_cpu_seconds"], "reserved_gpu_s": cost["reserved_gpu_seconds"],
                    "cost": cost, "total_s": round(time.time() - started, 1)})
        console.log.info(f"[compare] {name} {LABELS[d]}: CA {percent(ca)} ASR {percent(asr)} ({wall:.0f} s)")
    return out


def _ensure_backdoored(cfg: Config) -> None:
    if storage.exists(cfg.defend.model, cfg.storage):
        return
    from ..pipeline import run_pipeline
    phases = ["prepare", "poison", "train"]  # prepared and poisoned shards are reused when their config is unchanged
    run_pipeline(dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, phases=phases)))


def write_comparison(rows: list[dict], output: str, cfg: Config) -> None:
    write_report_files(output, "comparison", cfg, rows, COLUMNS, comparison_markdown(rows), comparison_png(rows))
