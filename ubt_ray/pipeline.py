"""`ubt pipeline`: the configured phases in order, each reading what the one before wrote."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import console, storage
from .checks import check_config
from .config import Config
from .manifest import finished_output


@dataclass
class PipelineResult:
    summary: dict = field(default_factory=dict)


def _reusable(cfg: Config, out: str, signature) -> dict | None:
    """The manifest of a finished output in `out` with the same fingerprint, when pipeline.reuse allows reuse."""
    return finished_output(out, lambda: signature(cfg), cfg) if cfg.pipeline.reuse else None


def run_pipeline(cfg: Config) -> PipelineResult:
    """Run `pipeline.phases` and return a summary (row counts, model, CA/ASR, time per phase)."""
    check_config(cfg, "pipeline")  # every phase's rules, before the first phase runs
    summary: dict = {"phases": {}}
    model_uri = cfg.model.checkpoint
    console.log.info(f"ubt pipeline: {', '.join(cfg.pipeline.phases)} -> {cfg.run.output_dir}")
    for phase in cfg.pipeline.phases:
        started = time.time()
        if phase == "prepare":
            from .phases.prepare import prepare, prepare_fingerprint
            if _reusable(cfg, cfg.prepare.output, prepare_fingerprint):
                summary["phases"]["prepare"] = {"reused": cfg.prepare.output}
                console.log.info(f"[prepare] reused {cfg.prepare.output} (same settings)")
                continue
            r = prepare(cfg)
            summary["phases"]["prepare"] = {"rows_out": r.rows.rows_out, "rows_rejected": r.rows.rows_rejected}
        elif phase == "poison":
            from .phases.poison import poison, poison_fingerprint
            done = _reusable(cfg, cfg.poison.output, poison_fingerprint)
            if done is not None:
                summary["phases"]["poison"] = {"reused": cfg.poison.output, "attack": done["attack"],
                                               "num_poisoned": done["num_poisoned"]}
                console.log.info(f"[poison] reused {cfg.poison.output} (same settings)")
                continue
            r = poison(cfg)
            summary["phases"]["poison"] = {"attack": cfg.poison.attack, "num_poisoned": r.num_poisoned}
        elif phase == "train":
            from .phases.train import train
            r = train(cfg)
            model_uri = r.model
            summary["train_rows"] = r.rows
            summary["phases"]["train"] = {"model": r.model, "rows": r.rows, "steps": r.steps, "samples": r.samples}
        elif phase == "evaluate":
            from .phases.evaluate import evaluate
            r = evaluate(cfg, model_uri)
            summary["metrics"] = r.metrics
            summary["phases"]["evaluate"] = {"clean_accuracy": r.clean_accuracy,
                                             "clean_accuracy_heldout": r.clean_accuracy_heldout,
                                             "attack_success_rate": r.attack_success_rate}
        elif phase == "defend":
            from .phases.defend import defend
            r = defend(cfg)
            summary["defense"] = r.report
            summary["phases"]["defend"] = {"model": r.model, "report": storage.join(r.output, "report.md"),
                                           "defense_wall_time_s": r.report["defense_wall_time_s"],
                                           **({"reused": r.output} if r.report.get("reused") else {})}
        summary["phases"][phase]["wall_time_s"] = round(time.time() - started, 1)
    return PipelineResult(summary)


def format_summary(summary: dict) -> str:
    """The pipeline's result as a table a person reads at the end of a run."""
    lines = [f"{'phase':<10} {'time':>9}  result"]
    for phase, info in summary["phases"].items():
        if "reused" in info:
            result = f"reused {info['reused']}"
        elif phase == "prepare":
            result = f"{info['rows_out']} rows written, {info['rows_rejected']} rejected"
        elif phase == "poison":
            result = f"{info['num_poisoned']} rows poisoned ({info['attack']})"
        elif phase == "train":
            result = f"{info['steps']} steps, {info['samples']} samples over {info['rows']} rows -> {info['model']}"
        elif phase == "defend":
            result = (f"UBT (overfit, score, select, unlearn) {info['defense_wall_time_s']:.1f} s -> {info['model']}; "
                      f"report {info['report']}")
        else:
            asr = info["attack_success_rate"]
            held = info.get("clean_accuracy_heldout")
            result = (f"CA {100 * info['clean_accuracy']:.1f}%"
                      + (f" (held-out prompts {100 * held:.1f}%)" if held is not None else "")
                      + (f"   ASR {100 * asr:.1f}%" if asr is not None else ""))
        took = f"{info['wall_time_s']:.1f} s" if "wall_time_s" in info else "-"
        lines.append(f"{phase:<10} {took:>9}  {result}")
    if "defense" in summary:
        from .report import before_after_table
        lines += ["", before_after_table(summary["defense"])]
    return "\n".join(lines)
